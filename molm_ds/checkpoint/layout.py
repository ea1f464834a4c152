"""Where everything of a checkpoint lives: file and directory names, and nothing else.

    <checkpoint dir>/
      latest                          DeepSpeed's pointer to the newest tag
      step_00000100/                  one tag per save
        mp_rank_00_model_states.pt    {"module": non-expert weights, ...} (+ client_state when trained)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per (MoE sub-layer L, GLOBAL expert E)
        *optim_states.pt              DeepSpeed's optimizer shards (training checkpoints only)
        rng_rank{r}.pt                python / numpy / torch RNG state of rank r (training checkpoints)
        optim_universal/rank{r}.pt    rank r's share of the optimizer state by parameter and global expert
                                      (topology-free: resume at another world size / ep_size / ZeRO stage)
        job.yaml                      the job that wrote it
        model.json                    the model it holds: config and MoE sub-layers (``record``)
        COMPLETE                      written last, once every rank finished (``marker``)

L counts expert-parallel MoE sub-layers in ``named_modules()`` order (block 0 attention, block 0 MLP,
...), each file holding ``<sub-layer>.experts.deepspeed_moe.experts.deepspeed_experts.{E}.{w1|w2|w_q|w_o}``
(one expert's slice, DeepSpeed's MoE naming). Expert files are keyed by global expert id: that is what
lets the weights load at any ep_size.
"""

from __future__ import annotations

import os
import re

from molm_ds.errors import CheckpointError

__all__ = [
    "COMPLETE", "MODEL_FILE", "JOB_FILE", "MODEL_RECORD", "LATEST", "UNIVERSAL_DIR", "EXPERT_INFIX", "tag_for", "step_of", "is_tag",
    "list_tags", "expert_file", "list_expert_files", "listed_files", "check_expert_files", "expert_key", "parse_expert_key", "rng_file",
    "universal_file", "tag_files",
]

COMPLETE = "COMPLETE"
MODEL_FILE = "mp_rank_00_model_states.pt"
JOB_FILE = "job.yaml"
MODEL_RECORD = "model.json"
LATEST = "latest"
UNIVERSAL_DIR = "optim_universal"  # topology-free optimizer state (molm_ds.checkpoint.optim_state)
EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert key infix
RETIRED_PREFIX = ".retired-"
_TAG = re.compile(r"^step_(\d+)$")
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\." + re.escape(EXPERT_INFIX) + r"\.(?P<e>\d+)\.(?P<name>\w+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_tag(name: str) -> bool:
    return _TAG.match(name) is not None


def step_of(tag: str) -> int:
    m = _TAG.match(os.path.basename(os.path.normpath(tag)))
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(m.group(1))


def list_tags(ckpt_dir: str) -> list[str]:
    """Tag directory names in ckpt_dir, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if _TAG.match(t) and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=step_of)


def expert_file(ckpt_dir: str, tag: str, layer_id: int, expert_id: int, mp_rank: int = 0) -> str:
    """Path of one expert's file (DeepSpeed's ``_get_expert_ckpt_name``)."""
    return os.path.join(ckpt_dir, str(tag), f"layer_{layer_id}_expert_{expert_id}_mp_rank_{mp_rank:02d}_model_states.pt")


def list_expert_files(ckpt_dir: str, tag: str) -> dict[tuple[int, int], str]:
    """{(layer L, global expert E): path} of the expert files in a tag directory."""
    d = os.path.join(ckpt_dir, str(tag))
    listed = listed_files(d)
    out = {}
    for f in os.listdir(d):
        m = _EXPERT_FILE.match(f)
        if m and (listed is None or f in listed):
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(d, f)
    return out


def listed_files(tag_dir: str):
    """The files a tag's verified COMPLETE marker lists (readers take no others), or None while the tag has
    no verified marker (a save in progress)."""
    from molm_ds.checkpoint.marker import marker_problem

    marker, _ = marker_problem(os.path.dirname(tag_dir) or ".", os.path.basename(tag_dir))
    return None if marker is None else set(marker["files"])


def check_expert_files(ckpt_dir: str, tag: str, info) -> None:
    """CheckpointError naming what is missing unless the tag has exactly one file per (expert-parallel
    sub-layer, global expert) of ``info`` (an ``ExpertParallelInfo``)."""
    have = list_expert_files(ckpt_dir, tag)
    want = {(l.ckpt_layer_id, e) for l in info.layers for e in range(l.num_experts)}
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {os.path.join(ckpt_dir, str(tag))}: expert files do not match the model "
            f"({len(info.layers)} expert-parallel sub-layers): missing (layer, expert) {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}; was it written with the same model and "
            "replicate_attention_experts setting, and did every rank finish writing?")


def expert_key(prefix: str, expert_id: int, name: str) -> str:
    """The key of one expert's slice of the stacked weight ``<prefix>.<name>`` (prefix ends in ``.experts``)."""
    return f"{prefix}.{EXPERT_INFIX}.{expert_id}.{name}"


def parse_expert_key(key: str):
    """(prefix, global expert id, weight name) of an expert file's key, or None."""
    m = _EXPERT_KEY.match(key)
    return None if m is None else (m["prefix"], int(m["e"]), m["name"])


def rng_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")


def universal_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, UNIVERSAL_DIR, f"rank{rank:05d}.pt")


def tag_files(tag_dir: str) -> list[str]:
    """Every file of a tag directory (relative paths, sorted), COMPLETE itself excluded."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != COMPLETE and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)
