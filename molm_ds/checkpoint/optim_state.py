"""Topology-free optimizer state on disk: save at one world size and ep_size, load at another.

Legend: a *key* names one parameter tensor as a single process would hold it: the parameter's name for
a dense tensor, ``name[e]`` for global expert ``e`` of a stacked expert tensor (the expert's slice,
[in, out]). A *piece* is a contiguous range of a key's flattened values: ``(offset, numel, values)``
with ``values = {"fp32": master weights, "exp_avg": ..., "exp_avg_sq": ...}`` (fp32).

Each rank writes its pieces to ``optim_universal/rank{r}.pt`` (``{"pieces": {key: [piece]}, "steps":
{key: Adam step or None}}``). The pieces written by all ranks of one save cover every key exactly once,
whatever the topology, so a new topology assembles the ranges it owns from them (``Pieces.fetch``).
Which ranges a rank owns and where DeepSpeed keeps them is ``molm_ds.parallel.optim_state``'s business.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

from molm_ds.checkpoint.layout import UNIVERSAL_DIR, universal_file
from molm_ds.errors import CheckpointError

__all__ = ["piece_key", "split", "write_pieces", "Pieces", "masters_from_pieces"]


def piece_key(name: str, expert_id: Optional[int] = None) -> str:
    """The key of a dense tensor (``expert_id`` None) or of one global expert's slice of a stacked one."""
    return name if expert_id is None else f"{name}[{expert_id}]"


def split(name: str, start: int, numel: int, *, first_expert: int = 0,
          per_expert: Optional[int] = None) -> Iterator[tuple[str, int, int, int]]:
    """A range of a local parameter's flat values -> (key, offset in key, numel, offset in the range).
    Stacked expert tensors [E_l, ...] (``per_expert``: numel of one expert's slice; local expert 0 is
    global ``first_expert``) split by global expert; dense tensors (``per_expert`` None) are one key."""
    if per_expert is None:
        yield name, start, numel, 0
        return
    pos, end = start, start + numel
    while pos < end:
        local, off = divmod(pos, per_expert)
        n = min(per_expert - off, end - pos)
        yield piece_key(name, first_expert + local), off, n, pos - start
        pos += n


def write_pieces(ckpt_dir: str, tag: str, rank: int, pieces: dict, steps: dict) -> None:
    """Rank ``rank``'s share of the optimizer state of tag ``tag``."""
    path = universal_file(ckpt_dir, tag, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"pieces": pieces, "steps": steps}, path)


class Pieces:
    """Every rank file of a tag's topology-free optimizer state, memory-mapped; assembles key ranges."""

    def __init__(self, tag_dir: str) -> None:
        from molm_ds.checkpoint.layout import listed_files

        d = os.path.join(tag_dir, UNIVERSAL_DIR)
        listed = listed_files(tag_dir)  # files the marker does not list are never read
        self.index: dict[str, list[tuple[int, int, dict]]] = {}
        self.steps: dict[str, Optional[int]] = {}
        for f in sorted(os.listdir(d)):
            if listed is not None and f"{UNIVERSAL_DIR}/{f}" not in listed:
                continue
            blob = torch.load(os.path.join(d, f), map_location="cpu", weights_only=False, mmap=True)
            self.steps.update(blob["steps"])
            for key, pieces in blob["pieces"].items():
                self.index.setdefault(key, []).extend(pieces)
        for pieces in self.index.values():
            pieces.sort(key=lambda p: p[0])
        self.where = d

    def fetch(self, key: str, offset: int, numel: int) -> dict:
        pieces = self.index.get(key)
        if pieces is None:
            raise CheckpointError(f"{self.where}: no optimizer state for {key} (was the checkpoint written for this "
                                  "model and strategy?)")
        out: dict[str, list] = {}
        pos, end = offset, offset + numel
        for off, n, values in pieces:
            if off + n <= pos or off >= end:
                continue
            if off > pos:
                break
            take = min(end, off + n) - pos
            for k, v in values.items():
                out.setdefault(k, []).append(v[pos - off:pos - off + take])
            pos += take
            if pos == end:
                break
        if pos != end:
            raise CheckpointError(f"{self.where}: optimizer state of {key} does not cover [{offset}, {end}) "
                                  f"(a rank file is missing or damaged)")
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in out.items()}


def masters_from_pieces(tag_dir: str, shapes: dict, *, stacked: set[str]) -> dict[str, torch.Tensor]:
    """The fp32 master of every trained tensor from the topology-free optimizer state (``stacked``: the
    names of stacked expert tensors, assembled by global id); tensors with no pieces (frozen) are left out."""
    pieces, out = Pieces(tag_dir), {}
    for name, shape in shapes.items():
        if name in stacked:
            keys = [piece_key(name, e) for e in range(shape[0])]
            if all(k in pieces.index for k in keys):
                per = shape[1:].numel()
                out[name] = torch.stack([pieces.fetch(k, 0, per)["fp32"].view(shape[1:]) for k in keys])
        elif name in pieces.index:
            out[name] = pieces.fetch(name, 0, shape.numel())["fp32"].view(shape)
    return out
