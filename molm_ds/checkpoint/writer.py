"""Plain models into a checkpoint: a weights-only tag in the trainer's layout (pruning, expert
insertion, imports)."""

from __future__ import annotations

import os
from typing import Optional

import torch
import yaml

from molm_ds.checkpoint.layout import JOB_FILE, LATEST, MODEL_FILE, expert_file, expert_key, is_tag, step_of, tag_files
from molm_ds.checkpoint.marker import digests, mark_complete
from molm_ds.checkpoint.record import model_record, write_model_record

__all__ = ["model_section", "write_model"]


def model_section(cfg, preset: str = "tiny") -> dict:
    """A job's ``model`` section that builds exactly ``cfg``: the preset plus every field that differs."""
    from molm_ds.config import ModelConfig

    base = ModelConfig.from_preset(preset).model_dump(mode="json")
    full = cfg.model_dump(mode="json")
    return {"preset": preset, "overrides": {k: v for k, v in full.items() if v != base[k]}}


def write_model(model, job: dict, out_dir: str, *, tag: str, kind: str, extra_files: Optional[dict] = None) -> str:
    """Write a plain model as a weights-only checkpoint ``out_dir/<tag>/`` in the trainer's layout (loads
    with ``load_model``, as a job's ``init_from``, at any ep_size that divides the expert counts).

    ``job``: the job dict to store (its ``model`` section is replaced by one that builds this model;
    ``init_from``, ``continual`` and ``resume`` are dropped: they described how it was made, not what
    it is). ``kind``: recorded in COMPLETE (``pruned``, ``grown``, ``imported``). ``extra_files``:
    {name: YAML-able dict} written beside (e.g. prune.yaml). Returns the tag directory."""
    from molm_ds.model.sublayers import moe_sublayers

    d = os.path.join(out_dir, tag)
    os.makedirs(d, exist_ok=True)
    expert_keys = set()
    for layer_id, sub in enumerate(moe_sublayers(model)):  # every sub-layer's experts in expert files
        names = [n for n, _ in sub.module.experts.named_parameters(recurse=False)]
        for e in range(int(sub.module.num_experts)):
            out = {expert_key(f"{sub.name}.experts", e, n): getattr(sub.module.experts, n)[e].detach().clone().cpu()
                   for n in names}
            torch.save(out, expert_file(out_dir, tag, layer_id, e))
        expert_keys.update(sub.stacked_params())
    sd = model.state_dict()
    torch.save({"module": {k: v.detach().cpu() for k, v in sd.items() if k not in expert_keys}}, os.path.join(d, MODEL_FILE))
    job = {k: v for k, v in job.items() if k not in ("init_from", "continual", "resume")}
    job["model"] = model_section(model.config, (job.get("model") or {}).get("preset", "tiny"))
    with open(os.path.join(d, JOB_FILE), "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    write_model_record(d, model_record(model))
    for name, content in (extra_files or {}).items():
        with open(os.path.join(d, name), "w") as f:
            yaml.safe_dump(content, f, sort_keys=False)
    mark_complete(d, {"kind": kind, "step": step_of(tag) if is_tag(tag) else None}, digests(d, tag_files(d)))
    with open(os.path.join(out_dir, LATEST), "w") as f:
        f.write(tag)
    return d
