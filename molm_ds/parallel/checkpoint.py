"""DeepSpeed checkpoint layout for expert-parallel models, and weight loading at any ep_size.

`engine.save_checkpoint(save_dir, tag)` on an expert-parallel model (after `parallelize`) writes
    save_dir/tag/mp_rank_00_model_states.pt                       non-expert weights + client_state
    save_dir/tag/layer_{L}_expert_{E}_mp_rank_00_model_states.pt  one per (expert-parallel sub-layer L,
                                                                  GLOBAL expert E), keys
        <sub-layer>.experts.deepspeed_moe.experts.deepspeed_experts.{E}.{w1|w2|w_q|w_o}  (one expert's slice)
    save_dir/tag/*optim_states.pt                                 optimizer shards (ZeRO: one per rank;
                                                                  ZeRO-0: expp_rank_{p}_... per expert rank)
L counts expert-parallel sub-layers in `named_modules()` order (`ExpertParallelInfo.layers[i].ckpt_layer_id`).
Because expert files are keyed by global id, the weights load at any ep_size (`load_weights`);
optimizer state is sharded by rank and needs the same world and ep sizes to resume.
"""

from __future__ import annotations

import os
import re

from molm_ds.log import get_logger

__all__ = ["check_expert_files", "expert_file", "list_expert_files", "load_weights"]

log = get_logger("parallel")
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def expert_file(save_dir: str, tag: str, layer_id: int, expert_id: int, mp_rank: int = 0) -> str:
    """Path DeepSpeed uses for one expert (same as DeepSpeedEngine._get_expert_ckpt_name)."""
    return os.path.join(save_dir, str(tag), f"layer_{layer_id}_expert_{expert_id}_mp_rank_{mp_rank:02d}_model_states.pt")


def list_expert_files(save_dir: str, tag: str) -> dict[tuple[int, int], str]:
    """{(layer L, global expert E): path} of the expert files in a checkpoint tag directory."""
    d = os.path.join(save_dir, str(tag))
    out = {}
    for f in os.listdir(d):
        m = _EXPERT_FILE.match(f)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(d, f)
    return out


def check_expert_files(save_dir: str, tag: str, info) -> None:
    """Raise FileNotFoundError naming what is missing unless the checkpoint has exactly one file per
    (expert-parallel sub-layer, global expert) of `info` (an ExpertParallelInfo)."""
    have = list_expert_files(save_dir, tag)
    want = {(l.ckpt_layer_id, e) for l in info.layers for e in range(l.num_experts)}
    missing = sorted(want - set(have))
    extra = sorted(set(have) - want)
    if missing or extra:
        raise FileNotFoundError(
            f"checkpoint {os.path.join(save_dir, str(tag))}: expert files do not match the model "
            f"({len(info.layers)} expert-parallel sub-layers): missing (layer, expert) {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}; was it written with the same model and "
            "replicate_attention_experts setting, and did every rank finish writing?"
        )


def load_weights(engine, load_dir: str, tag: str | None = None, *, strict: bool = True):
    """Load only the model weights of a DeepSpeed checkpoint into `engine` (any ep_size / world size:
    each rank reads its own global experts). Optimizer, scheduler and counters are not restored.
    Returns (load_path, client_state)."""
    path, client_state = engine.load_checkpoint(
        load_dir, tag, load_module_strict=strict, load_optimizer_states=False,
        load_lr_scheduler_states=False, load_module_only=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint found in {load_dir!r} (tag {tag!r})")
    return path, client_state
