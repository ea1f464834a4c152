"""A checkpoint's weights as one plain (single-process) state dict, whatever topology wrote it:
expert files stacked back by global id, and (bf16/fp16 runs) the fp32 master weights instead of the
rounded ones, from the topology-free optimizer state or from DeepSpeed's own optimizer shards."""

from __future__ import annotations

import os

import torch

from molm_ds.checkpoint import ds_masters
from molm_ds.checkpoint.layout import MODEL_FILE, UNIVERSAL_DIR, list_expert_files, parse_expert_key
from molm_ds.checkpoint.marker import read_marker
from molm_ds.checkpoint.optim_state import masters_from_pieces
from molm_ds.checkpoint.record import model_config, read_job, read_model_record
from molm_ds.errors import CheckpointError

__all__ = ["read_model_state", "has_fp32_masters", "read_fp32_state"]


def read_model_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every expert file stacked back by global id: a single-process state dict."""
    d = os.path.join(ckpt_dir, tag)
    main = os.path.join(d, MODEL_FILE)
    if not os.path.isfile(main):
        raise CheckpointError(f"{main} missing: {d} is not a complete checkpoint")
    sd = dict(torch.load(main, map_location="cpu", weights_only=False)["module"])
    per: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for (_, _), f in sorted(list_expert_files(ckpt_dir, tag).items()):
        for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
            parsed = parse_expert_key(k)
            if parsed is None:
                raise CheckpointError(f"{f}: unexpected key {k!r} (not a molm-ds expert slice)")
            prefix, e, name = parsed
            per.setdefault((prefix, name), {})[e] = v
    for (prefix, name), by_id in per.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"checkpoint {d}: {prefix}.{name} has expert files for ids {ids}; some are missing")
        sd[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in ids])
    return sd


def has_fp32_masters(ckpt_dir: str, tag: str) -> bool:
    """Whether the tag is a bf16/fp16 trainer checkpoint whose optimizer shards hold fp32 master weights."""
    main = os.path.join(ckpt_dir, tag, MODEL_FILE)
    if not os.path.isfile(main):
        return False
    ds_config = torch.load(main, map_location="cpu", weights_only=False, mmap=True).get("ds_config") or {}
    return ds_masters.has_fp32_masters(os.path.join(ckpt_dir, tag), ds_config)


def read_fp32_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """``read_model_state`` in fp32, with the fp32 master copy of every trained parameter when the run
    trained in bf16/fp16 instead of the rounded weights: from the topology-free optimizer state when the
    checkpoint has one, else from DeepSpeed's own optimizer shards (any ZeRO stage 0-2 and ep_size:
    ``molm_ds.checkpoint.ds_masters``). An fp32 run's weights are its masters. Frozen parameters keep
    their saved value."""
    from molm_ds.model import MoLM

    sd = read_model_state(ckpt_dir, tag)
    d = os.path.join(ckpt_dir, tag)
    record = read_model_record(ckpt_dir, tag)
    stacked = {f"{s['name']}.experts.{w}" for s in record["sublayers"] for w in s["stacked"]}
    if read_marker(ckpt_dir, tag).get("topology", {}).get("bf16") and os.path.isdir(os.path.join(d, UNIVERSAL_DIR)):
        sd.update(masters_from_pieces(d, {k: v.shape for k, v in sd.items()}, stacked=stacked))
    elif has_fp32_masters(ckpt_dir, tag):
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in MoLM(model_config(ckpt_dir, tag)).named_parameters()}
        sharded = {f"{s['name']}.experts.{w}" for s in record["sublayers"] if s["expert_parallel"] for w in s["stacked"]}
        parallel = read_job(ckpt_dir, tag).get("parallel") or {}
        sd.update(ds_masters.read_fp32_masters(d, low_precision=sd, shapes=shapes,
                                               ep_size=int(parallel.get("ep_size", 1)), expert_parallel=sharded))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
