"""The checkpoint layout: the one module that writes, resolves and reads molm-ds checkpoints.

    <checkpoint dir>/
      latest                          DeepSpeed's pointer to the newest tag
      step_00000100/                  one tag per save
        mp_rank_00_model_states.pt    {"module": non-expert weights, ...} (+ client_state when trained)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per (MoE sub-layer L, GLOBAL expert E)
        *optim_states.pt              optimizer shards (training checkpoints only)
        rng_rank{r}.pt                python / numpy / torch RNG state of rank r (training checkpoints)
        optim_universal/rank{r}.pt    rank r's share of the optimizer state by parameter and global expert
                                      (topology-free: resume at another world size / ep_size / ZeRO stage)
        job.yaml                      the job that wrote it; its model section describes the model
        COMPLETE                      written last, once every rank finished (JSON: kind, step, the saving
                                      topology, and every file's size and xxh3-64 digest)

Two writers share it: ``save`` (the trainer, through DeepSpeed's engine, with optimizer state) and
``write_model`` (a plain model, weights only: pruning, expert insertion, imports). Everything else reads
it through ``resolve`` / ``resolve_resume`` (which tag), ``model_config`` / ``read_model_state`` /
``load_model`` (a plain single-process model at whatever ep_size the files were written) and ``load``
(the trainer's resume). Expert files are keyed by global expert id: that is what lets the weights load
at any ep_size. L counts expert-parallel MoE sub-layers in ``named_modules()`` order (block 0
attention, block 0 MLP, ...), each file holding ``<sub-layer>.experts.deepspeed_moe.experts.
deepspeed_experts.{E}.{w1|w2|w_q|w_o}`` (one expert's slice, DeepSpeed's MoE naming).

A tag without COMPLETE is partial (a run killed while saving) and is never read; a tag whose files do
not match COMPLETE (missing, truncated, damaged bytes) is refused by name (``verify``), and
``resume: auto`` falls back to the newest one that verifies. Old tags are retired by renaming them
out of the tag namespace before deleting them, so no crash leaves a half-deleted tag marked complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
import yaml

from molm_ds.errors import CheckpointError
from molm_ds.log import get_logger

log = get_logger("train.checkpoint")

__all__ = [
    "COMPLETE", "MODEL_FILE", "JOB_FILE", "CheckpointError", "tag_for", "step_of", "list_tags", "is_complete",
    "newest_complete", "resolve", "resolve_resume", "expert_file", "list_expert_files", "check_expert_files",
    "save", "load", "load_weights", "read_job", "model_config", "read_model_state", "load_model", "write_model",
    "has_fp32_masters", "read_fp32_state", "load_fp32_model",
    "model_section", "rng_state", "set_rng_state", "verify", "read_marker", "file_digest", "topology",
    "engine_topology", "can_load_natively", "check_same_model", "UNIVERSAL_DIR",
]

COMPLETE = "COMPLETE"
MODEL_FILE = "mp_rank_00_model_states.pt"
JOB_FILE = "job.yaml"
EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts"  # DeepSpeed's per-expert key infix
_TAG = re.compile(r"^step_(\d+)$")
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\." + re.escape(EXPERT_INFIX) + r"\.(?P<e>\d+)\.(?P<name>\w+)$")


# ---- names ---------------------------------------------------------------------------------------
def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def newest_complete(ckpt_dir: str) -> Optional[str]:
    done = [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)]
    return done[-1] if done else None


def expert_file(ckpt_dir: str, tag: str, layer_id: int, expert_id: int, mp_rank: int = 0) -> str:
    """Path of one expert's file (DeepSpeed's ``_get_expert_ckpt_name``)."""
    return os.path.join(ckpt_dir, str(tag), f"layer_{layer_id}_expert_{expert_id}_mp_rank_{mp_rank:02d}_model_states.pt")


def list_expert_files(ckpt_dir: str, tag: str) -> dict[tuple[int, int], str]:
    """{(layer L, global expert E): path} of the expert files in a tag directory."""
    d = os.path.join(ckpt_dir, str(tag))
    out = {}
    for f in os.listdir(d):
        m = _EXPERT_FILE.match(f)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(d, f)
    return out


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


# ---- which tag -----------------------------------------------------------------------------------
def resolve(path: str, *, what: str = "checkpoint") -> tuple[str, str]:
    """(checkpoint dir, tag) for a checkpoint directory (its newest complete tag) or a tag directory
    (which must be complete). ``what`` names the option in error messages (``init_from``, ``--checkpoint``)."""
    p = os.path.normpath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{what}: {path} does not exist; give a checkpoint directory or a step_NNNNNNNN tag "
                              "directory of a finished run")
    if os.path.isfile(os.path.join(p, MODEL_FILE)) or _TAG.match(os.path.basename(p)):  # a tag directory
        parent, tag = os.path.dirname(p) or ".", os.path.basename(p)
        if not is_complete(parent, tag):
            older = [t for t in list_tags(parent) if is_complete(parent, t) and t != tag]
            raise CheckpointError(f"{what}: {p} is a partial checkpoint (no {COMPLETE} marker: a rank did not finish "
                                  f"writing); use a complete one{': ' + older[-1] if older else ''}")
        return parent, tag
    tag = newest_complete(p)
    if tag is None:
        raise CheckpointError(f"{what}: no complete checkpoint in {p} (tags found: {list_tags(p) or 'none'})")
    return p, tag


def resolve_resume(resume: Optional[str], ckpt_dir: str, *, collective: bool = False) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) to resume from, or None for a fresh start. Every candidate is verified
    against its COMPLETE marker (sizes and digests; ``collective``: the ranks share the reading, every
    rank must call).

    ``auto``: the newest tag in ckpt_dir that verifies, saying which newer ones it skipped and why; no
    tags at all = fresh start (logged); tags but none usable = error. A path: a checkpoint directory (its
    newest complete tag) or a tag directory; missing, partial or damaged = an error naming the problem,
    never a fresh start.
    """
    if resume is None:
        return None
    if resume != "auto":
        d, tag = resolve(resume, what="resume")
        problem = verify(d, tag, collective=collective)
        if problem is not None:
            older = [t for t in list_tags(d) if is_complete(d, t) and step_of(t) < step_of(tag)]
            raise CheckpointError(f"resume: {problem}; resume from an older checkpoint"
                                  + (f" ({os.path.join(d, older[-1])})" if older else "") + " or start fresh")
        return d, tag
    tags = list_tags(ckpt_dir)
    if not tags:
        log.info("resume: auto: no checkpoint in %s, starting fresh", ckpt_dir)
        return None
    problems = []
    for tag in reversed(tags):
        problem = verify(ckpt_dir, tag, collective=collective)
        if problem is None:
            for p in problems:
                log.warning("resume: auto: skipping %s", p)
            return ckpt_dir, tag
        problems.append(problem)
    raise CheckpointError(f"resume: auto: no usable checkpoint in {ckpt_dir} ({'; '.join(problems)}); delete them to "
                          "start fresh or point resume at a complete one")


# ---- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")


# ---- integrity -------------------------------------------------------------------------------------
def _tag_files(tag_dir: str) -> list[str]:
    """Every file of a tag directory (relative paths, sorted), COMPLETE itself excluded."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tag_dir)
            if rel != COMPLETE and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def file_digest(path: str) -> str:
    """xxh3-64 of a file's bytes (about 3 GB/s in memory; reading it back dominates: see docs/training.md)."""
    import xxhash

    h = xxhash.xxh3_64()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _digests(tag_dir: str, names: list[str]) -> dict[str, dict]:
    return {n: {"size": os.path.getsize(os.path.join(tag_dir, n)), "xxh3": file_digest(os.path.join(tag_dir, n))}
            for n in names}


def _collective_digests(tag_dir: str, names: list[str]) -> dict[str, dict]:
    """Digests of ``names``, each rank reading an interleaved share (collective); the union on every rank."""
    from molm_ds.parallel import comm

    r, w = comm.rank(), comm.world_size()
    out: dict[str, dict] = {}
    for part in comm.all_gather_object(_digests(tag_dir, names[r::w])):
        out.update(part)
    return out


def read_marker(ckpt_dir: str, tag: str) -> dict:
    """The COMPLETE marker's JSON ({} for an empty or unreadable marker of an older molm-ds)."""
    try:
        with open(os.path.join(ckpt_dir, tag, COMPLETE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _mark_complete(tag_dir: str, info: dict, files: dict[str, dict]) -> None:
    """The COMPLETE marker, written last and atomically: what wrote the tag and every file's size and digest."""
    tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "time": time.time(), "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, COMPLETE))


def verify(ckpt_dir: str, tag: str, *, collective: bool = False) -> Optional[str]:
    """None when every file the marker lists is there with its size and digest, else what is wrong
    (naming the file). ``collective``: ranks share the reading (every rank must call)."""
    d = os.path.join(ckpt_dir, tag)
    marker = read_marker(ckpt_dir, tag)
    if not is_complete(ckpt_dir, tag):
        return f"{d} has no {COMPLETE} marker (partial: a rank did not finish writing)"
    files = marker.get("files")
    if not isinstance(files, dict):
        return None  # written before markers carried digests: nothing to compare against
    missing = sorted(n for n in files if not os.path.isfile(os.path.join(d, n)))
    if missing:
        return f"{d}: file {missing[0]} is missing ({len(missing)} of {len(files)} files missing)"
    for n, want in files.items():
        size = os.path.getsize(os.path.join(d, n))
        if size != want["size"]:
            return f"{d}: file {n} has {size} bytes, the marker says {want['size']} (truncated or replaced)"
    names = sorted(n for n in files if "xxh3" in files[n])
    got = _collective_digests(d, names) if collective else _digests(d, names)
    bad = [n for n in names if got[n]["xxh3"] != files[n]["xxh3"]]
    if bad:
        return f"{d}: file {bad[0]} does not match its digest (damaged bytes; {len(bad)} file(s) differ)"
    return None


def _retire(ckpt_dir: str, tag: str) -> None:
    """Delete a tag so that no crash can leave it half deleted but marked: first move it out of the tag
    namespace (one atomic rename), then remove it."""
    trash = os.path.join(ckpt_dir, f".retired-{tag}-{os.getpid()}")
    os.replace(os.path.join(ckpt_dir, tag), trash)
    shutil.rmtree(trash, ignore_errors=True)


def retire_all(ckpt_dir: str) -> None:
    """Delete every tag of a checkpoint directory (an explicit overwrite), safely."""
    for tag in list_tags(ckpt_dir):
        _retire(ckpt_dir, tag)
    if os.path.isfile(os.path.join(ckpt_dir, "latest")):
        os.remove(os.path.join(ckpt_dir, "latest"))


def _clean_retired(ckpt_dir: str) -> None:
    for name in os.listdir(ckpt_dir):
        if name.startswith(".retired-"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


# ---- the trainer's checkpoints (DeepSpeed engine) ------------------------------------------------
UNIVERSAL_DIR = "optim_universal"  # topology-free optimizer state (molm_ds.parallel.optim_state)


def topology(*, world_size: int, ep_size: int, replicate_attention_experts: bool, zero_stage: int, bf16: bool) -> dict:
    """What a DeepSpeed-native resume needs to be the same (else the elastic path reshards)."""
    return {"world_size": int(world_size), "ep_size": int(ep_size),
            "replicate_attention_experts": bool(replicate_attention_experts), "zero_stage": int(zero_stage),
            "bf16": bool(bf16)}


def engine_topology(engine, ep_info) -> dict:
    from molm_ds.parallel import comm

    return topology(world_size=comm.world_size(), ep_size=ep_info.ep_size if ep_info is not None else 1,
                    replicate_attention_experts=bool(ep_info.replicated) if ep_info is not None else False,
                    zero_stage=engine.zero_optimization_stage() if engine.zero_optimization() else 0,
                    bf16=engine.bfloat16_enabled())


def save(engine, ckpt_dir: str, step: int, client_state: dict, *, job_yaml: str, ep_info=None, keep: int = 0,
         elastic: bool = True) -> str:
    """Save on every rank (collective). Every rank writes its files (DeepSpeed's shards, its RNG, its
    share of the topology-free optimizer state); after a barrier the ranks digest the files together and
    rank 0 writes COMPLETE, then retires checkpoints beyond ``keep``. Returns the tag."""
    from molm_ds.parallel import comm
    from molm_ds.parallel.optim_state import local_pieces

    tag = tag_for(step)
    d = os.path.join(ckpt_dir, tag)
    rank = comm.rank()
    t0 = time.time()
    if rank == 0 and os.path.isdir(d):
        _retire(ckpt_dir, tag)  # an unmarked leftover of a save of this step that died
    comm.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    torch.save(rng_state(), _rng_file(ckpt_dir, tag, rank))
    if elastic:
        os.makedirs(os.path.join(d, UNIVERSAL_DIR), exist_ok=True)
        pieces, steps = local_pieces(engine)
        torch.save({"pieces": pieces, "steps": steps}, os.path.join(d, UNIVERSAL_DIR, f"rank{rank:05d}.pt"))
    comm.barrier()  # every rank's files are on disk
    if rank == 0:
        if ep_info is not None:
            check_expert_files(ckpt_dir, tag, ep_info)
        with open(os.path.join(d, JOB_FILE), "w") as f:
            f.write(job_yaml)
    comm.barrier()
    names = comm.broadcast_object(_tag_files(d) if rank == 0 else None)
    files = _collective_digests(d, names)
    if rank == 0:
        _mark_complete(d, {"kind": "train", "step": step, "topology": engine_topology(engine, ep_info),
                            "elastic": elastic},
                       files)
        if keep > 0:
            for old in [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)][:-keep]:
                _retire(ckpt_dir, old)
        _clean_retired(ckpt_dir)
    comm.barrier()  # nobody reads a checkpoint before it is marked
    size = sum(f["size"] for f in files.values())
    log.info("saved checkpoint %s (%.1f MB) in %.1fs", d, size / 1e6, time.time() - t0)
    return tag


def can_load_natively(marker: dict, current: dict) -> bool:
    """DeepSpeed's own loader needs the same world size, ep_size, expert replication, ZeRO stage, dtype."""
    return marker.get("topology", {}) == current


def load(engine, ckpt_dir: str, tag: str, *, ep_info=None) -> dict:
    """Restore a trainer checkpoint into an engine; returns the client_state. The same topology as the
    save: DeepSpeed's own loader (bit-identical). Another one (world size, ep_size, ZeRO stage, dtype):
    the elastic path, weights by global expert and the fp32 masters and Adam moments resharded from the
    topology-free pieces."""
    from molm_ds.parallel import comm

    if not is_complete(ckpt_dir, tag):
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)} is partial (no {COMPLETE} marker)")
    marker = read_marker(ckpt_dir, tag)
    if "topology" in marker and not can_load_natively(marker, engine_topology(engine, ep_info)):
        return _load_elastic(engine, ckpt_dir, tag, marker)
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
    rng = _rng_file(ckpt_dir, tag, comm.rank())
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s missing (saved with a different world size?): RNG streams restart from the seed", rng)
    return client_state or {}


class _Pieces:
    """Every rank file of a tag's topology-free optimizer state, memory-mapped; assembles key ranges."""

    def __init__(self, tag_dir: str) -> None:
        d = os.path.join(tag_dir, UNIVERSAL_DIR)
        self.index: dict[str, list[tuple[int, int, dict]]] = {}
        self.steps: dict[str, Optional[int]] = {}
        for f in sorted(os.listdir(d)):
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


def _load_elastic(engine, ckpt_dir: str, tag: str, marker: dict) -> dict:
    from molm_ds.parallel import comm
    from molm_ds.parallel.optim_state import load_pieces

    d = os.path.join(ckpt_dir, tag)
    if not marker.get("elastic") or not os.path.isdir(os.path.join(d, UNIVERSAL_DIR)):
        raise CheckpointError(f"resume: {d} was saved without its topology-free optimizer state "
                              "(checkpoint.elastic: false), so it resumes only at the topology it was saved at "
                              f"({marker.get('topology')}); start from its weights with init_from: {d}")
    missing, unexpected = engine.module.load_state_dict(read_model_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    pieces = _Pieces(d)
    try:
        load_pieces(engine, pieces.fetch, pieces.steps)
    except ValueError as exc:
        raise CheckpointError(f"resume: {d}: {exc}") from None
    main = torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=False)
    engine.global_steps = int(main.get("global_steps", 0))
    engine.global_samples = int(main.get("global_samples", 0))
    engine.skipped_steps = int(main.get("skipped_steps", 0))
    was = marker.get("topology", {})
    log.info("resumed %s elastically: saved at world %s ep %s ZeRO-%s%s, now world %d", d, was.get("world_size"),
             was.get("ep_size"), was.get("zero_stage"), " bf16" if was.get("bf16") else "", comm.world_size())
    return {k: v for k, v in main.items() if k not in ("module", "optimizer", "lr_scheduler")}


def load_weights(engine, ckpt_dir: str, tag: Optional[str] = None, *, strict: bool = True):
    """Only the model weights into ``engine``, at any ep_size (each rank reads its own global experts).
    Returns (load_path, client_state)."""
    path, client_state = engine.load_checkpoint(ckpt_dir, tag, load_module_strict=strict, load_optimizer_states=False,
                                                load_lr_scheduler_states=False, load_module_only=True)
    if path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint found in {ckpt_dir!r} (tag {tag!r})")
    return path, client_state


# ---- plain models --------------------------------------------------------------------------------
def read_job(ckpt_dir: str, tag: str) -> dict:
    """The job.yaml of a tag, as a dict."""
    job_file = os.path.join(ckpt_dir, tag, JOB_FILE)
    if not os.path.isfile(job_file):
        raise CheckpointError(f"{job_file} missing: not a molm-ds checkpoint (written by launch/pretrain.py, "
                              "launch/prune.py or molm_ds.continual.grow_checkpoint)")
    with open(job_file) as f:
        return yaml.safe_load(f) or {}


def model_config(ckpt_dir: str, tag: str):
    """The model a tag holds: its job's model section, grown by its continual section (if any)."""
    from molm_ds.train.job import ModelSection

    raw = read_job(ckpt_dir, tag)
    try:
        cfg = ModelSection(**raw.get("model", {})).build()
    except ValueError as exc:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag, JOB_FILE)}: model section does not build ({exc})") from None
    cont = raw.get("continual") or {}
    return cfg.grown(attention=int(cont.get("attention", 0)), mlp=int(cont.get("mlp", 0)))


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
            m = _EXPERT_KEY.match(k)
            if m is None:
                raise CheckpointError(f"{f}: unexpected key {k!r} (not a molm-ds expert slice)")
            per.setdefault((m["prefix"], m["name"]), {})[int(m["e"])] = v
    for (prefix, name), by_id in per.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"checkpoint {d}: {prefix}.{name} has expert files for ids {ids}; some are missing")
        sd[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in ids])
    return sd


def load_model(path: str, *, expect=None, what: str = "checkpoint", check: bool = True):
    """The plain (full, single-process) MoLM held by a checkpoint directory or tag. ``expect``: the
    ModelConfig the caller believes it holds; a mismatch is a CheckpointError naming the fields.
    ``check``: verify the files against the COMPLETE marker first (a caller that verified already
    passes False)."""
    from molm_ds.model import MoLM

    ckpt_dir, tag = resolve(path, what=what)
    if check and (problem := verify(ckpt_dir, tag)) is not None:
        raise CheckpointError(f"{what}: {problem}")
    cfg = model_config(ckpt_dir, tag)
    if expect is not None:
        check_same_model(cfg, expect, where=os.path.join(ckpt_dir, tag), what=what)
    model = MoLM(cfg)
    missing, unexpected = model.load_state_dict(read_model_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit its job's model: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    return model


def has_fp32_masters(ckpt_dir: str, tag: str) -> bool:
    """Whether the tag is a bf16/fp16 trainer checkpoint whose optimizer shards hold fp32 master weights."""
    from molm_ds.train import ds_masters

    main = os.path.join(ckpt_dir, tag, MODEL_FILE)
    if not os.path.isfile(main):
        return False
    ds_config = torch.load(main, map_location="cpu", weights_only=False, mmap=True).get("ds_config") or {}
    return ds_masters.has_fp32_masters(os.path.join(ckpt_dir, tag), ds_config)


def read_fp32_state(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """``read_model_state`` in fp32, with the fp32 master copy of every trained parameter when the run
    trained in bf16/fp16 instead of the rounded weights: from the topology-free optimizer state when the
    checkpoint has one, else from DeepSpeed's own optimizer shards (any ZeRO stage 0-2 and ep_size:
    ``molm_ds.train.ds_masters``). An fp32 run's weights are its masters. Frozen parameters keep their
    saved value."""
    from molm_ds.model import MoLM
    from molm_ds.train.ds_masters import read_fp32_masters

    sd = read_model_state(ckpt_dir, tag)
    d = os.path.join(ckpt_dir, tag)
    if read_marker(ckpt_dir, tag).get("topology", {}).get("bf16") and os.path.isdir(os.path.join(d, UNIVERSAL_DIR)):
        sd.update(_masters_from_pieces(d, {k: v.shape for k, v in sd.items()}))
    elif has_fp32_masters(ckpt_dir, tag):
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in MoLM(model_config(ckpt_dir, tag)).named_parameters()}
        parallel = read_job(ckpt_dir, tag).get("parallel") or {}
        replicated = bool(parallel.get("replicate_attention_experts", False))
        sharded = {n for n in shapes if ".mlpf.experts." in n or (".attn.experts." in n and not replicated)}
        sd.update(read_fp32_masters(d, low_precision=sd, shapes=shapes, ep_size=int(parallel.get("ep_size", 1)),
                                    expert_parallel=sharded))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _masters_from_pieces(tag_dir: str, shapes: dict) -> dict[str, torch.Tensor]:
    """The fp32 master of every trained tensor from the topology-free optimizer state (stacked experts
    assembled by global id); tensors with no pieces (frozen) are left out."""
    from molm_ds.parallel.optim_state import STACKED_SUFFIXES

    pieces, out = _Pieces(tag_dir), {}
    for name, shape in shapes.items():
        if name.endswith(STACKED_SUFFIXES):
            keys = [f"{name}[{e}]" for e in range(shape[0])]
            if all(k in pieces.index for k in keys):
                per = shape[1:].numel()
                out[name] = torch.stack([pieces.fetch(k, 0, per)["fp32"].view(shape[1:]) for k in keys])
        elif name in pieces.index:
            out[name] = pieces.fetch(name, 0, shape.numel())["fp32"].view(shape)
    return out


def load_fp32_model(path: str, *, what: str = "checkpoint", check: bool = True):
    """``load_model`` with the fp32 masters (``read_fp32_state``): the full-precision plain model."""
    from molm_ds.model import MoLM

    ckpt_dir, tag = resolve(path, what=what)
    if check and (problem := verify(ckpt_dir, tag)) is not None:
        raise CheckpointError(f"{what}: {problem}")
    model = MoLM(model_config(ckpt_dir, tag))
    missing, unexpected = model.load_state_dict(read_fp32_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit its job's model: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}")
    return model


def check_same_model(have, want, *, where: str, what: str = "init_from") -> None:
    """CheckpointError unless two ModelConfigs are equal, naming the differing fields and the fix."""
    if have == want:
        return
    a, b = have.model_dump(), want.model_dump()
    diff = {k: a[k] for k in a if a[k] != b[k]}
    raise CheckpointError(f"{what} {where} holds a different model than the job's model section: the checkpoint has "
                          f"{diff}, the job {({k: b[k] for k in diff})}; the model section must describe the model in "
                          f"the checkpoint: set model.overrides to include {diff} (or pick the right preset / checkpoint)")


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
    d = os.path.join(out_dir, tag)
    os.makedirs(d, exist_ok=True)
    expert_keys = set()
    layer_id = 0
    for prefix, module in model.named_modules():
        if not (hasattr(module, "router") and hasattr(module, "experts")):
            continue
        names = [n for n, _ in module.experts.named_parameters(recurse=False)]
        for e in range(int(module.num_experts)):
            out = {f"{prefix}.experts.{EXPERT_INFIX}.{e}.{n}": getattr(module.experts, n)[e].detach().clone().cpu()
                   for n in names}
            torch.save(out, expert_file(out_dir, tag, layer_id, e))
        expert_keys.update(f"{prefix}.experts.{n}" for n in names)
        layer_id += 1
    sd = model.state_dict()
    torch.save({"module": {k: v.detach().cpu() for k, v in sd.items() if k not in expert_keys}}, os.path.join(d, MODEL_FILE))
    job = {k: v for k, v in job.items() if k not in ("init_from", "continual", "resume")}
    job["model"] = model_section(model.config, (job.get("model") or {}).get("preset", "tiny"))
    with open(os.path.join(d, JOB_FILE), "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(d, name), "w") as f:
            yaml.safe_dump(content, f, sort_keys=False)
    _mark_complete(d, {"kind": kind, "step": step_of(tag) if _TAG.match(tag) else None}, _digests(d, _tag_files(d)))
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(tag)
    return d
