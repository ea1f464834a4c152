"""DeepSpeed's fp32 master weights, read back from a bf16/fp16 run's optimizer shards into one plain
(single-process) state dict. Called by ``molm_ds.checkpoint.read_fp32_state``, which owns the
checkpoint layout; this module only knows DeepSpeed 0.19's optimizer files.

Legend: W world size, P ep_size, E_l = E / P local experts of an expert-parallel rank.

ZeRO 1/2 (and DeepSpeed's BF16 optimizer): one ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` per
rank r, whose ``optimizer_state_dict`` holds, for every optimizer group g,
    single_partition_of_fp32_groups[g]   rank r's slice of the group's flat fp32 buffer
    param_slice_mappings[g]              {parameter name: fragment_address(start, numel)}: the parameters
                                         with elements in that slice, where they sit in it
    base_optimizer_state.param_groups[g]["moe"]   True for an expert group
A dense group is partitioned over all W ranks; an expert group over the expert-data-parallel group of
the rank's expert-parallel position (W / P ranks holding the same experts). Each parameter is contiguous
in the flat buffer, so its fragments, taken in partition order, concatenate to the whole parameter
(alignment and group padding never enter a fragment).

ZeRO 0 (``FP16_UnfusedOptimizer``, for bf16 and fp16): nothing is partitioned; each expert-parallel
position e writes ``expp_rank_{e}_mp_rank_00_optim_states.pt`` whose ``["optimizer"]["fp32_groups"][g]``
is the fp32 copy of group g's parameters, in the group's order, without names. DeepSpeed keeps each
group in model order, so the tensors of a group are matched to the model's parameters in order, each to
the next one of the same shape whose saved low-precision value it rounds to; a match that is not unique
across groups is refused rather than guessed.

Expert parameters carry the engine's names with local shape [E_l, ...]; expert-parallel position e holds
global experts e * E_l .. (e + 1) * E_l - 1, and they are stacked back by global id.
"""

from __future__ import annotations

import os
import re
import torch

from molm_ds.errors import CheckpointError

__all__ = ["has_fp32_masters", "read_fp32_masters"]

_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_EXPP_FILE = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _files(tag_dir: str, pattern: re.Pattern) -> dict[int, str]:
    from molm_ds.checkpoint.layout import listed_files

    listed = listed_files(tag_dir)  # files the marker does not list are never read
    out = {}
    for f in os.listdir(tag_dir):
        m = pattern.match(f)
        if m and (listed is None or f in listed):
            out[int(m.group(1))] = os.path.join(tag_dir, f)
    return dict(sorted(out.items()))


def has_fp32_masters(tag_dir: str, ds_config: dict) -> bool:
    """Whether the tag was trained in bf16/fp16 and so holds fp32 masters in its optimizer files."""
    low = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "bfloat16", "fp16"))
    return bool(low) and bool(_files(tag_dir, _ZERO_FILE) or _files(tag_dir, _EXPP_FILE))


def _layout(world: int, ep_size: int) -> dict[int, tuple[int, int]]:
    """{global rank: (expert-parallel position, expert-data-parallel position)}, from DeepSpeed's own rule."""
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    ep_groups, edp_groups = _get_expert_parallel_ranks(world, 1, ep_size)
    out = {}
    for g in ep_groups:
        for i, r in enumerate(g):
            out[r] = (i, None)
    for g in edp_groups:
        for i, r in enumerate(g):
            out[r] = (out[r][0], i)
    return out


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise CheckpointError(f"{path} cannot be read as a DeepSpeed optimizer file ({type(e).__name__}: {e})") from None


def _stack_experts(local: dict[str, dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: {ep position: [E_l, ...]}} -> {name: [E, ...]} by global expert id."""
    out = {}
    for name, by_pos in local.items():
        if sorted(by_pos) != list(range(len(by_pos))):
            raise CheckpointError(f"fp32 masters of {name}: expert-parallel positions {sorted(by_pos)} found, some missing")
        out[name] = torch.cat([by_pos[e] for e in sorted(by_pos)])
    return out


def _read_zero(files: dict[int, str], shapes: dict[str, torch.Size], ep_size: int) -> dict[str, torch.Tensor]:
    world = len(files)
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"ZeRO optimizer files for ranks {sorted(files)}: some rank's file is missing")
    layout = _layout(world, ep_size)
    dense: dict[str, list[tuple[int, torch.Tensor]]] = {}
    expert: dict[str, dict[int, list[tuple[int, torch.Tensor]]]] = {}
    for rank, path in files.items():
        osd = _load(path).get("optimizer_state_dict") or {}
        flat, maps = osd.get("single_partition_of_fp32_groups"), osd.get("param_slice_mappings")
        groups = (osd.get("base_optimizer_state") or {}).get("param_groups")
        if flat is None or maps is None or groups is None or not (len(flat) == len(maps) == len(groups)):
            raise CheckpointError(f"{path}: not a ZeRO-1/2 optimizer file of DeepSpeed 0.19 (needs "
                                  "single_partition_of_fp32_groups, param_slice_mappings and param groups)")
        ep_pos, edp_pos = layout[rank]
        for part, mapping, group in zip(flat, maps, groups):
            for name, addr in mapping.items():
                piece = part.narrow(0, addr.start, addr.numel).float()
                if group.get("moe"):
                    expert.setdefault(name, {}).setdefault(ep_pos, []).append((edp_pos, piece))
                else:
                    dense.setdefault(name, []).append((rank, piece))
    out = {name: torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])]) for name, pieces in dense.items()}
    local = {name: {e: torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])]) for e, pieces in by_pos.items()}
             for name, by_pos in expert.items()}
    for name, by_pos in local.items():
        full = shapes.get(name)
        if full is None:
            raise CheckpointError(f"fp32 masters: expert parameter {name!r} is not in the model")
        by_pos.update({e: t.view(full[0] // ep_size, *full[1:]) for e, t in by_pos.items()})
    out.update(_stack_experts(local))
    return _shaped(out, shapes)


def _shaped(flat: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in flat.items():
        if name not in shapes:
            raise CheckpointError(f"fp32 masters: parameter {name!r} is not in the model")
        if t.numel() != shapes[name].numel():
            raise CheckpointError(f"fp32 masters of {name}: {t.numel()} elements found, the model has "
                                  f"{shapes[name].numel()}; a rank's optimizer file is missing or from another run")
        out[name] = t.reshape(shapes[name])
    return out


def _match_unnamed(groups: list[list[torch.Tensor]], candidates: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Name the fp32 tensors of each group: in order, each takes the next model parameter (in model order)
    of its shape whose saved low-precision value it rounds to. Refuses when two groups claim a parameter."""
    names = list(candidates)
    owner: dict[str, int] = {}
    out = {}
    for g, tensors in enumerate(groups):
        pos = 0
        for t in tensors:
            while pos < len(names):
                ref = candidates[names[pos]]
                pos += 1
                if ref.shape == t.shape and torch.equal(t.to(ref.dtype), ref):
                    name = names[pos - 1]
                    if name in owner:
                        raise CheckpointError(f"{where}: fp32 masters cannot be told apart ({name} fits optimizer groups "
                                              f"{owner[name]} and {g}); export the low-precision weights with --no-masters")
                    owner[name] = g
                    out[name] = t.float()
                    break
            else:
                raise CheckpointError(f"{where}: an fp32 master of shape {tuple(t.shape)} in optimizer group {g} matches no "
                                      "saved weight; the optimizer file is not from this checkpoint")
    return out


def _read_zero0(files: dict[int, str], low: dict[str, torch.Tensor], shapes: dict[str, torch.Size],
                expert_names: set[str], ep_size: int) -> dict[str, torch.Tensor]:
    if sorted(files) != list(range(ep_size)):
        raise CheckpointError(f"ZeRO-0 optimizer files for expert-parallel ranks {sorted(files)}; expected 0..{ep_size - 1}")
    out: dict[str, torch.Tensor] = {}
    local: dict[str, dict[int, torch.Tensor]] = {}
    for e, path in files.items():
        opt = _load(path).get("optimizer") or {}
        fp32 = opt.get("fp32_groups")
        if fp32 is None:
            raise CheckpointError(f"{path}: no fp32_groups (DeepSpeed's fused fp16 optimizer or another layout); export "
                                  "the low-precision weights with --no-masters")
        # this position's view of the model: the dense weights (the same at every position) and its own
        # slice of every expert weight
        cand = {}
        for name, w in low.items():
            if name in expert_names:
                El = shapes[name][0] // ep_size
                cand[name] = w[e * El:(e + 1) * El]
            elif name in shapes:
                cand[name] = w
        for name, t in _match_unnamed(fp32, cand, path).items():
            if name in expert_names:
                local.setdefault(name, {})[e] = t
            elif e == 0:
                out[name] = t
    out.update(_stack_experts(local))
    return out


def read_fp32_masters(tag_dir: str, *, low_precision: dict[str, torch.Tensor], shapes: dict[str, torch.Size],
                      ep_size: int, expert_parallel: set[str]) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 master} of every parameter the optimizer held (frozen ones are absent), full
    shapes, experts stacked by global id. ``low_precision``: the tag's saved weights (a full state dict);
    ``shapes``: the plain model's parameter shapes; ``expert_parallel``: the names of the parameters that
    were sliced over the ``ep_size`` ranks. Every master is checked to round to its saved weight."""
    zero = _files(tag_dir, _ZERO_FILE)
    if zero:
        out = _read_zero(zero, shapes, ep_size)
    else:
        out = _read_zero0(_files(tag_dir, _EXPP_FILE), low_precision, shapes, expert_parallel, ep_size)
    for name, t in out.items():
        ref = low_precision.get(name)
        if ref is None or not torch.equal(t.to(ref.dtype), ref):
            raise CheckpointError(f"{tag_dir}: the fp32 master of {name} does not round to the saved weight; the "
                                  "optimizer files do not belong to this tag")
    return out
