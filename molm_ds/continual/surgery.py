"""Expert insertion: grow every MoE sub-layer by N freshly initialised experts and the router's A by
N new rows A' (B, b shared), in a plain model or in a DeepSpeed checkpoint.

Legend: E experts before, N new experts, D d_model, R router width.

- ``grow_experts(model, attention=N_a, mlp=N_m, seed=s)``: on a plain ``MoLM`` (before ``parallelize``).
  Stacked expert weights [E, ...] become [E + N, ...] (old rows first, untouched), ``router.w_gate``
  [E, R] becomes [E + N, R]; counts, dispatcher and ``model.config`` follow. New experts get the
  model's expert init (U(-1/fan_in, 1/fan_in)), new rows N(0, init_std), drawn from a generator seeded
  with ``seed`` (identical on every rank). Each sub-layer remembers ``continual_old_experts = E``
  (which global ids are frozen) for ``molm_ds.continual.groups``.
- ``load_checkpoint_model(path)``: the plain (full, single-process) model held by a DeepSpeed checkpoint
  written by the trainer, at whatever ep_size it was written (expert files are keyed by global id).
- ``grow_checkpoint(src, dst, attention=, mlp=, seed=)``: the same surgery on checkpoint files: writes
  a weights-only DeepSpeed-layout checkpoint with new router rows and new per-expert files.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
import yaml
from torch import nn

from molm_ds.config import ModelConfig
from molm_ds.continual.config import grown_config
from molm_ds.log import get_logger
from molm_ds.model import MoLM
from molm_ds.model.dispatch import LocalDispatcher

__all__ = ["grow_experts", "new_expert_counts", "resolve_checkpoint", "checkpoint_model_config",
           "load_checkpoint_model", "grow_checkpoint", "grown_config"]

log = get_logger("continual")

_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<name>\w+)$")
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
MODEL_FILE = "mp_rank_00_model_states.pt"


def _kind(layer: nn.Module) -> str:
    return "attention" if hasattr(layer.experts, "w_q") else "mlp"


def _new_expert_rows(w_EIO: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    fan_in = w_EIO.shape[1]  # same init as molm_ds.model.experts
    return torch.empty((n,) + tuple(w_EIO.shape[1:]), dtype=torch.float32).uniform_(
        -1.0 / fan_in, 1.0 / fan_in, generator=gen).to(w_EIO.dtype)


@torch.no_grad()
def grow_experts(model: MoLM, *, attention: int, mlp: int, seed: int) -> MoLM:
    """Insert ``attention`` new experts into every MoA sub-layer and ``mlp`` into every MoE MLP sub-layer
    of a plain model, in place (returned). Old experts keep ids 0..E-1 and their weights bit for bit."""
    if attention < 0 or mlp < 0:
        raise ValueError(f"grow_experts: new expert counts must be >= 0, got attention={attention}, mlp={mlp}")
    if getattr(model, "_molm_expert_parallel", None) is not None:
        raise ValueError("grow_experts: the model is already expert-parallel; insert experts into the plain model "
                         "before parallelize()")
    gen = torch.Generator().manual_seed(int(seed))
    std = model.config.init_std
    for layer in model.moe_layers():
        n = attention if _kind(layer) == "attention" else mlp
        E = int(layer.num_experts)
        layer.continual_old_experts = E
        if n == 0:
            continue
        experts, router = layer.experts, layer.router
        for name, p in list(experts.named_parameters(recurse=False)):
            new = _new_expert_rows(p, n, gen)
            setattr(experts, name, nn.Parameter(torch.cat([p.detach(), new.to(p.device)], 0),
                                                requires_grad=p.requires_grad))
        rows = (torch.randn((n, router.w_gate.shape[1]), generator=gen) * std).to(router.w_gate)
        router.w_gate = nn.Parameter(torch.cat([router.w_gate.detach(), rows], 0),
                                     requires_grad=router.w_gate.requires_grad)
        router.num_experts = layer.num_experts = E + n
        layer.dispatcher = LocalDispatcher(E + n)
    model.config = grown_config(model.config, attention=attention, mlp=mlp)
    log.info("inserted %d attention and %d MLP experts per layer: now %d / %d", attention, mlp,
             model.config.n_att_experts, model.config.n_mlp_experts)
    return model


def new_expert_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{sub-layer name: (old experts, experts now)} of a grown model."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "continual_old_experts"):
            out[name] = (m.continual_old_experts, int(m.num_experts))
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint dir, tag) for a checkpoint directory (its newest complete tag) or a tag directory."""
    from molm_ds.train import checkpoint as ckpt

    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from: {path} does not exist; give a checkpoint directory or a "
                                "step_NNNNNNNN tag directory of a finished run")
    p = os.path.normpath(path)
    if os.path.isfile(os.path.join(p, MODEL_FILE)):  # a tag directory
        parent, tag = os.path.dirname(p) or ".", os.path.basename(p)
        if not ckpt.is_complete(parent, tag):
            raise FileNotFoundError(f"init_from: {p} is a partial checkpoint (no {ckpt.COMPLETE} marker); "
                                    "point init_from at a complete one")
        return parent, tag
    tag = ckpt.newest_complete(p)
    if tag is None:
        raise FileNotFoundError(f"init_from: no complete checkpoint in {p} (tags: {ckpt.list_tags(p) or 'none'})")
    return p, tag


def checkpoint_model_config(ckpt_dir: str, tag: str) -> ModelConfig:
    """The model a checkpoint holds: its job's model section, grown by its continual section (if any)."""
    from molm_ds.train.job import ModelSection

    job_file = os.path.join(ckpt_dir, tag, "job.yaml")
    if not os.path.isfile(job_file):
        raise FileNotFoundError(f"{job_file} missing: init_from needs a checkpoint written by molm-ds "
                                "(launch/pretrain.py) or by grow_checkpoint")
    with open(job_file) as f:
        raw = yaml.safe_load(f) or {}
    cfg = ModelSection(**raw.get("model", {})).build()
    cont = raw.get("continual") or {}
    return grown_config(cfg, attention=int(cont.get("attention", 0)), mlp=int(cont.get("mlp", 0)))


def _read_full_state_dict(ckpt_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Non-expert weights plus every expert file stacked back by global id: a single-process state dict."""
    d = os.path.join(ckpt_dir, tag)
    sd = dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=False)["module"])
    per: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(os.listdir(d)):
        if not _EXPERT_FILE.match(f):
            continue
        for k, v in torch.load(os.path.join(d, f), map_location="cpu", weights_only=False).items():
            m = _EXPERT_KEY.match(k)
            if m is None:
                raise ValueError(f"{f}: unexpected key {k!r} (not a molm-ds expert slice)")
            per.setdefault((m["prefix"], m["name"]), {})[int(m["e"])] = v
    for (prefix, name), by_id in per.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"checkpoint {d}: {prefix}.{name} has expert files for ids {ids}; some are missing")
        sd[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in ids])
    return sd


def load_checkpoint_model(path: str, *, expect: Optional[ModelConfig] = None) -> MoLM:
    """The plain model held by a checkpoint (dir or tag). ``expect``: the config the caller thinks it
    holds; a mismatch is a ValueError naming the fields to change."""
    ckpt_dir, tag = resolve_checkpoint(path)
    cfg = checkpoint_model_config(ckpt_dir, tag)
    if expect is not None:
        check_same_model(cfg, expect, where=os.path.join(ckpt_dir, tag))
    model = MoLM(cfg)
    sd = _read_full_state_dict(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit model {cfg}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    return model


def check_same_model(have: ModelConfig, want: ModelConfig, *, where: str) -> None:
    if have == want:
        return
    a, b = have.model_dump(), want.model_dump()
    diff = {k: a[k] for k in a if a[k] != b[k]}
    raise ValueError(f"init_from {where} holds a different model than the job's model section: the checkpoint has "
                     f"{diff}, the job {({k: b[k] for k in diff})}. The model section must describe the STARTING model: "
                     f"set model.overrides to include {diff} (or pick the right preset / checkpoint)")


def grow_checkpoint(src: str, dst_dir: str, *, attention: int, mlp: int, seed: int, tag: Optional[str] = None) -> str:
    """Offline surgery on a DeepSpeed checkpoint: write ``dst_dir/<tag>/`` (weights only) with the router
    rows extended and one new ``layer_{L}_expert_{E}`` file per inserted expert; the old expert files
    are copied byte for byte. Loads with ``load_checkpoint_model`` (or as an ``init_from``) at any ep_size
    dividing the new counts. Returns the tag directory."""
    ckpt_dir, src_tag = resolve_checkpoint(src)
    tag = tag or src_tag
    cfg = checkpoint_model_config(ckpt_dir, src_tag)
    model = MoLM(cfg)
    model.load_state_dict(_read_full_state_dict(ckpt_dir, src_tag))
    grow_experts(model, attention=attention, mlp=mlp, seed=seed)
    s, d = os.path.join(ckpt_dir, src_tag), os.path.join(dst_dir, tag)
    os.makedirs(d, exist_ok=True)
    main = torch.load(os.path.join(s, MODEL_FILE), map_location="cpu", weights_only=False)
    full = model.state_dict()
    main = {"module": {k: full[k].clone() for k in main["module"]}, "grown_from": os.path.abspath(s)}
    torch.save(main, os.path.join(d, MODEL_FILE))
    # expert files: layer id L -> sub-layer prefix, read from the old files
    layer_prefix: dict[int, str] = {}
    for f in os.listdir(s):
        m = _EXPERT_FILE.match(f)
        if m:
            shutil.copyfile(os.path.join(s, f), os.path.join(d, f))
            key = next(iter(torch.load(os.path.join(s, f), map_location="cpu", weights_only=False)))
            layer_prefix[int(m.group(1))] = _EXPERT_KEY.match(key)["prefix"]
    for L, prefix in sorted(layer_prefix.items()):
        layer = model.get_submodule(prefix.removesuffix(".experts"))
        for e in range(layer.continual_old_experts, int(layer.num_experts)):
            out = {f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.{name}": p[e].detach().clone()
                   for name, p in layer.experts.named_parameters(recurse=False)}
            torch.save(out, os.path.join(d, f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt"))
    with open(os.path.join(s, "job.yaml")) as f:
        job = yaml.safe_load(f) or {}
    job["model"] = {"preset": job.get("model", {}).get("preset", "tiny"),
                    "overrides": {**job.get("model", {}).get("overrides", {}),
                                  "n_att_experts": model.config.n_att_experts, "n_mlp_experts": model.config.n_mlp_experts}}
    job.pop("continual", None)
    job.pop("init_from", None)
    with open(os.path.join(d, "job.yaml"), "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    from molm_ds.train import checkpoint as ckpt

    with open(os.path.join(d, ckpt.COMPLETE), "w") as f:
        f.write('{"grown": true}\n')
    with open(os.path.join(dst_dir, "latest"), "w") as f:
        f.write(tag)
    return d
