"""Read TensorBoard event files with TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ALL = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}


def event_dirs(root: str) -> list[str]:
    return sorted({d for d, _, files in os.walk(root) if any(f.startswith("events.out.tfevents") for f in files)})


def load(directory: str) -> EventAccumulator:
    acc = EventAccumulator(directory, size_guidance=ALL)
    acc.Reload()
    return acc


def scalars(root: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event directory under root."""
    out: dict[str, dict[int, float]] = {}
    for d in event_dirs(root):
        acc = load(d)
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out
