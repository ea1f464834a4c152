"""The trainer's checkpoints, through DeepSpeed's engine: weights, DeepSpeed's optimizer shards, every
rank's RNG and its share of the topology-free optimizer state, then COMPLETE. A resume at the saving
topology uses DeepSpeed's own loader (bit-identical); at another one (world size, ep_size, ZeRO stage,
dtype) the elastic path loads the weights by global expert and reshards the optimizer state."""

from __future__ import annotations

import os
import random
import time
from typing import Optional

import numpy as np
import torch

from molm_ds.checkpoint.layout import (
    COMPLETE, JOB_FILE, MODEL_FILE, UNIVERSAL_DIR, check_expert_files, list_tags, rng_file, tag_files, tag_for,
)
from molm_ds.checkpoint.consolidate import read_model_state
from molm_ds.checkpoint.marker import (
    clean_retired, collective_digests, is_complete, mark_complete, read_marker, retire,
)
from molm_ds.checkpoint.optim_state import Pieces, write_pieces
from molm_ds.checkpoint.record import model_record, write_model_record
from molm_ds.errors import CheckpointError
from molm_ds.storage import STORAGE_ERRNOS, StorageError, remove_quietly, storage_error
from molm_ds.log import get_logger

log = get_logger("checkpoint")

__all__ = ["rng_state", "set_rng_state", "topology", "engine_topology", "can_load_natively", "check_resumable",
           "save", "load", "load_weights"]


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


def _previous_size(ckpt_dir: str) -> Optional[int]:
    """Bytes of the newest complete tag (what the next save will need, about), from its marker."""
    from molm_ds.checkpoint.marker import marker_problem

    for tag in reversed(list_tags(ckpt_dir)):
        marker, _ = marker_problem(ckpt_dir, tag)
        if marker is not None:
            return sum(f["size"] for f in marker["files"].values())
    return None


class _Stage:
    """One stage of a collective save: a storage error on any rank ends every rank together (after the
    partial tag is removed), with the error of the rank that met it or a line naming that rank."""

    def __init__(self, ckpt_dir: str, tag: str, need: Optional[int]) -> None:
        self.ckpt_dir, self.tag, self.need = ckpt_dir, tag, need
        self.error: Optional[Exception] = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        from molm_ds.storage import _guess_errno, _torch_write_failure

        if exc is None:
            return False
        path = os.path.join(self.ckpt_dir, self.tag)
        if isinstance(exc, StorageError):
            self.error = exc
        elif isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            self.error = storage_error("checkpoint", path, exc.errno, need=self.need)
        elif isinstance(exc, RuntimeError) and _torch_write_failure(exc):  # torch.save's zip writer
            self.error = storage_error("checkpoint", path, _guess_errno(path), need=self.need)
        else:
            return False  # a bug: its traceback
        return True

    def settle(self) -> None:
        """Collective: raise on every rank when some rank's stage failed; rank 0 removes the partial tag."""
        from molm_ds.parallel import comm

        if not comm.any_rank(self.error is not None):
            return
        if comm.rank() == 0:
            remove_quietly([os.path.join(self.ckpt_dir, self.tag)])  # no marker: never a resume target anyway
        raise self.error or StorageError(f"cannot write checkpoint {os.path.join(self.ckpt_dir, self.tag)}: another "
                                         "rank's write failed (its own error line says why)")


def save(engine, ckpt_dir: str, step: int, client_state: dict, *, job_yaml: str, ep_info=None, keep: int = 0,
         elastic: bool = True) -> str:
    """Save on every rank (collective). Every rank writes its files (DeepSpeed's shards, its RNG, its
    share of the topology-free optimizer state); after a barrier the ranks digest the files together and
    rank 0 writes COMPLETE, then retires checkpoints beyond ``keep``. Returns the tag.

    A full disk, an I/O error or a read-only directory at any stage ends every rank with a
    ``StorageError`` (what, where, the free space and about how much was needed: the previous
    checkpoint's size); the partial tag is removed (it has no marker, so it is never a resume target
    either way) and the previous checkpoint stays the newest complete one."""
    from molm_ds.parallel import comm
    from molm_ds.parallel.optim_state import local_pieces

    tag = tag_for(step)
    d = os.path.join(ckpt_dir, tag)
    rank = comm.rank()
    t0 = time.time()
    need = _previous_size(ckpt_dir)
    if rank == 0 and os.path.isdir(d):
        retire(ckpt_dir, tag)  # an unmarked leftover of a save of this step that died
    comm.barrier()
    with _Stage(ckpt_dir, tag, need) as stage:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
        torch.save(rng_state(), rng_file(ckpt_dir, tag, rank))
        if elastic:
            write_pieces(ckpt_dir, tag, rank, *local_pieces(engine))
    stage.settle()  # every rank's files are on disk (a barrier), or every rank stops here
    with _Stage(ckpt_dir, tag, need) as stage:
        if rank == 0:
            if ep_info is not None:
                check_expert_files(ckpt_dir, tag, ep_info)
            with open(os.path.join(d, JOB_FILE), "w") as f:
                f.write(job_yaml)
            sharded = set() if ep_info is None else {layer.name for layer in ep_info.layers}
            write_model_record(d, model_record(engine.module, expert_parallel=sharded))
    stage.settle()
    names = comm.broadcast_object(tag_files(d) if rank == 0 else None)
    files = collective_digests(d, names)
    with _Stage(ckpt_dir, tag, need) as stage:
        if rank == 0:
            mark_complete(d, {"kind": "train", "step": step, "topology": engine_topology(engine, ep_info),
                              "elastic": elastic},
                          files)
    stage.settle()  # nobody reads a checkpoint before it is marked
    if rank == 0:
        if keep > 0:
            for old in [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)][:-keep]:
                retire(ckpt_dir, old)
        clean_retired(ckpt_dir)
    comm.barrier()
    size = sum(f["size"] for f in files.values())
    log.info("saved checkpoint %s (%.1f MB) in %.1fs", d, size / 1e6, time.time() - t0)
    return tag


def can_load_natively(marker: dict, current: dict) -> bool:
    """DeepSpeed's own loader needs the same world size, ep_size, expert replication, ZeRO stage, dtype."""
    return marker.get("topology", {}) == current


def check_resumable(ckpt_dir: str, tag: str, now: dict, *, marker: Optional[dict] = None) -> None:
    """CheckpointError unless the tag resumes at topology ``now``: the topology it was saved at
    (DeepSpeed's own loader), or any other when it was saved with its topology-free optimizer state."""
    marker = read_marker(ckpt_dir, tag) if marker is None else marker
    was = marker.get("topology")
    d = os.path.join(ckpt_dir, tag)
    if was is None or was == now or (marker.get("elastic") and os.path.isdir(os.path.join(d, UNIVERSAL_DIR))):
        return
    raise CheckpointError(f"resume: {d} was saved at {was} without its topology-free optimizer state "
                          f"(checkpoint.elastic: false), so it cannot resume at {now}: resume at the saved topology, "
                          f"or start from its weights with init_from: {d}")


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
        return _load_elastic(engine, ckpt_dir, tag, marker, ep_info)
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
    rng = rng_file(ckpt_dir, tag, comm.rank())
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s missing (saved with a different world size?): RNG streams restart from the seed", rng)
    return client_state or {}


def _load_elastic(engine, ckpt_dir: str, tag: str, marker: dict, ep_info) -> dict:
    from molm_ds.parallel import comm
    from molm_ds.parallel.optim_state import load_pieces

    d = os.path.join(ckpt_dir, tag)
    check_resumable(ckpt_dir, tag, engine_topology(engine, ep_info), marker=marker)
    missing, unexpected = engine.module.load_state_dict(read_model_state(ckpt_dir, tag), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{d}: weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    pieces = Pieces(d)
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
