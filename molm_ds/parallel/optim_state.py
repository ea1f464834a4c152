"""The optimizer state of a DeepSpeed engine as topology-free pieces (keys and pieces: see
``molm_ds.checkpoint.optim_state``, which writes and reads them): this rank's share out of the engine,
and the ranges this rank owns back into it, at any world size and ep_size.

Where the state lives differs by setup and this module hides it:
- ZeRO-1/2 and the bf16 optimizer: each rank holds a fragment of every parameter's flat fp32 master and
  Adam moments (DeepSpeed's ``_hp_mapping`` says where); expert parameters are partitioned over their
  expert-data-parallel group, dense ones over the data-parallel group. Each rank writes its fragments.
- ZeRO-0 (fp32: the client optimizer on the model params; bf16: DeepSpeed's unfused optimizer with
  fp32 master copies): per-parameter state, whole on every replica; only one replica writes it (global
  rank 0 for dense tensors, the expert-data-parallel rank 0 for experts).
Pieces written by all ranks of one save cover every key exactly once, whatever the topology, so a new
topology assembles the ranges it owns from them (``load_pieces``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from deepspeed.moe.utils import is_moe_param
from torch import Tensor

from molm_ds.checkpoint.optim_state import split
from molm_ds.model.sublayers import stacked_expert_params
from molm_ds.parallel import comm

__all__ = ["STATE_KEYS", "local_pieces", "load_pieces"]

STATE_KEYS = ("exp_avg", "exp_avg_sq")
Fetch = Callable[[str, int, int], dict]  # (key, offset, numel) -> {"fp32": Tensor[numel], "exp_avg": ..., ...}


def _partitioned(engine) -> Optional[tuple[list, list]]:
    """(lp param groups, flat hp partitions) of a ZeRO-1/2 or bf16 optimizer; None for ZeRO-0 fp32."""
    opt = engine.optimizer
    if hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups"):
        return opt.bit16_groups, opt.single_partition_of_fp32_groups
    if hasattr(opt, "bf16_groups") and hasattr(opt, "fp32_groups_flat_partition"):
        return opt.bf16_groups, opt.fp32_groups_flat_partition
    return None


def _replicated(engine) -> tuple[list[tuple], object]:
    """ZeRO-0: [(model param, fp32 master)] and the torch optimizer that holds their state. fp32 steps the
    client optimizer on the model params; bf16 (DeepSpeed's unfused optimizer) keeps fp32 master copies."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        pairs = [(lp, hp) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)]
        return pairs, opt.optimizer
    return [(p, p) for g in opt.param_groups for p in g["params"]], opt


def _base_optimizer(engine):
    return engine.optimizer.optimizer if _partitioned(engine) is not None else _replicated(engine)[1]


def _split(name: str, param: Tensor, start: int, numel: int, stacked: set[str]) -> Iterator[tuple[str, int, int, int]]:
    """A range of a local parameter's flat values -> pieces by key. Stacked expert tensors [E_l, ...]
    (``stacked``: their names, as the model publishes them) split by global expert (expert-parallel or
    replicated alike)."""
    if name not in stacked:
        return split(name, start, numel)
    return split(name, start, numel, first_expert=int(getattr(param, "_molm_first_expert", 0)),
                 per_expert=param[0].numel())


def _step(state: dict) -> Optional[int]:
    return int(state["step"]) if "step" in state else None


def local_pieces(engine) -> tuple[dict[str, list[tuple[int, int, dict]]], dict[str, Optional[int]]]:
    """This rank's share of the optimizer state: pieces by key (copies, on the CPU) and the Adam step of
    each key (None before its first update). The moments are read from the optimizer's own state, not
    from DeepSpeed's fragment views, which are linked once and miss groups first stepped later."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    stacked = stacked_expert_params(engine.module)
    pieces: dict[str, list] = {}
    steps: dict[str, Optional[int]] = {}

    def add(name, param, start, numel, values, step):
        for key, off, n, at in _split(name, param, start, numel, stacked):
            pieces.setdefault(key, []).append(
                (off, n, {k: v[at:at + n].detach().float().cpu().clone() for k, v in values.items()}))
            steps[key] = step

    part = _partitioned(engine)
    if part is not None:
        base = engine.optimizer.optimizer
        for lp_group, flat in zip(*part):
            state = base.state.get(flat, {})
            for lp in lp_group:
                m = lp._hp_mapping
                if m is None:
                    continue
                a = m.hp_fragment_address
                values = {"fp32": m.get_hp_fragment().flatten()}
                values.update({k: state[k].narrow(0, a.start, a.numel) for k in STATE_KEYS if k in state})
                add(names[id(lp)], lp, m.lp_fragment_address.start, m.lp_fragment_address.numel, values, _step(state))
        return pieces, steps
    # ZeRO-0: whole tensors on every replica, written by one of them
    pairs, base = _replicated(engine)
    edp_rank = _edp_rank(engine)
    for lp, hp in pairs:
        if is_moe_param(lp) and edp_rank != 0 or not is_moe_param(lp) and comm.rank() != 0:
            continue
        state = base.state.get(hp, {})
        values = {"fp32": hp.detach().flatten()}
        values.update({k: state[k].flatten() for k in STATE_KEYS if k in state})
        add(names[id(lp)], lp, 0, lp.numel(), values, _step(state))
    return pieces, steps


def _edp_rank(engine) -> int:
    from deepspeed.utils import groups

    names = {getattr(p, "group_name", None) for p in engine.module.parameters() if is_moe_param(p)}
    if not names:
        return comm.rank()
    return comm.rank(groups._get_expert_data_parallel_group(names.pop()))


def _step_value(opt, step: int):
    """Adam's step as the base optimizer keeps it: a float tensor for torch's AdamW, an int for
    DeepSpeedCPUAdam."""
    return step if type(opt).__name__ == "DeepSpeedCPUAdam" else torch.tensor(float(step))


def load_pieces(engine, fetch: Fetch, steps: dict[str, Optional[int]]) -> None:
    """Fill this rank's fp32 masters and Adam moments from pieces (``fetch`` assembles a key range) and
    set the Adam steps (``steps`` by key). The model's own (low-precision) weights must be loaded already."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    names = {id(p): n for n, p in engine.module.named_parameters()}
    stacked = stacked_expert_params(engine.module)

    def gather(name, param, start, numel) -> tuple[dict, set]:
        parts = [(fetch(key, off, n), steps.get(key)) for key, off, n, _ in _split(name, param, start, numel, stacked)]
        keys = set.intersection(*(set(v) for v, _ in parts)) if parts else set()
        return {k: torch.cat([v[k] for v, _ in parts]) for k in keys}, {st for _, st in parts}

    def one_step(found: set, what: str) -> Optional[int]:
        if len(found) > 1:
            raise ValueError(f"{what}: the saved tensors of one optimizer group have different Adam steps {sorted(found, key=str)}")
        return found.pop() if found else None

    part = _partitioned(engine)
    base = _base_optimizer(engine)
    if part is not None:
        for i, (lp_group, flat) in enumerate(zip(*part)):
            found, fragments = set(), []
            for lp in lp_group:
                m = lp._hp_mapping
                if m is None:
                    continue
                v, st = gather(names[id(lp)], lp, m.lp_fragment_address.start, m.lp_fragment_address.numel)
                m.get_hp_fragment().data.copy_(v["fp32"].view_as(m.get_hp_fragment()))
                fragments.append((m, v))
                found |= st
            step = one_step(found, f"optimizer group {i}")
            if step is None or not fragments:
                continue
            for m, v in fragments:
                m.optim_fragment = {k: v[k].to(flat.device) for k in STATE_KEYS}
            map_to_flat_opt_states(flat, lp_group, base.state, set(STATE_KEYS))
            base.state[flat]["step"] = _step_value(base, step)
        engine.optimizer._hp_optimizer_states_linked = False  # relink DeepSpeed's views on first use
        return
    pairs, base = _replicated(engine)
    for lp, hp in pairs:
        v, st = gather(names[id(lp)], lp, 0, lp.numel())
        with torch.no_grad():
            hp.copy_(v["fp32"].view_as(hp).to(hp.dtype))
            if lp is not hp:
                lp.copy_(hp.to(lp.dtype))
        step = one_step(st, names[id(lp)])
        if step is not None:
            base.state[hp] = {"step": _step_value(base, step),
                              **{k: v[k].view_as(hp).to(hp.device).clone() for k in STATE_KEYS}}
