"""Router-learning probe: a plain-PyTorch copy of the trainer's step with one knob per suspected cause.

It trains `molm_ds.model.MoLM` on `molm_ds.data.MixtureLoader` exactly as `molm_ds.train` does for a
single process (AdamW betas (0.9, 0.95), decay on every tensor with ndim >= 2, global grad-norm clip
1.0, linear warmup + cosine to 0.1 x lr, loss = CE + w_mi * MI), and every `--log-every` steps
measures, per MoE sub-layer:
  - H(m|x) / log E over the window (training tokens),
  - the gradient norm of the LM loss and of the MI loss alone on the router (B, b, A),
  - the router's hidden units: mean GELU pre-activation, fraction positive, fraction of units never
    positive over the window ("dead"),
  - the RMS of the experts' outputs (MLP) and of the sub-layer output, the mean summed gate,
  - dL/dgate split into its per-token mean over the k slots ("scale") and the rest ("choice"),
  - |m| / sqrt(v) of AdamW's moments on the router ("adam_snr").
At the end: validation loss over the whole validation split (all windows), H(m|x)/log E on it.

Knobs (each changes one factor; defaults = the shipped code, i.e. the fan_in router init):
  --set router_init=released        the router init before issue 16 (any ModelConfig key=value, repeatable)
  --expert-init {model,xavier,...}  re-initialise expert weights after construction
  --expert-scale S                  multiply every expert weight by S after init
  --router-std / --router-a-std     redraw router B / A from N(0, std^2) after the model's init
  --router-bias B                   set router b to B
  --router-lr-mult, --router-wd     router learning-rate multiplier and weight decay
  --mi W, --wd W, --lr LR, --renorm, --steps N, --seed S, --preset tiny|small

Reproduce the numbers in docs/router_learning.md (commands and flags there), e.g.:
    PYTHONPATH=. python experiments/router/probe.py --data DIR --steps 150 --log-every 25 --out run.jsonl
    PYTHONPATH=. python experiments/router/probe.py --data DIR --preset small --lr 3e-3 --steps 150
    python experiments/router/show.py run.jsonl
(DIR: `python -m data_prep.embedded --out DIR`, vocab 512, what the demo trains on.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import yaml

from molm_ds.config import ModelConfig
from molm_ds.data import DataSource, MixtureLoader
from molm_ds.model import MoLM
from molm_ds.train.schedule import lr_factor


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default="data/embedded", help="output dir of data_prep.embedded")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--mi", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--renorm", action="store_true")
    p.add_argument("--expert-init", default="model", choices=["model", "xavier", "normal_std", "fan_in_sqrt"],
                   help="model: whatever ModelConfig says; xavier: U(+-sqrt(6/(fan_in+fan_out))); "
                        "normal_std: N(0, init_std); fan_in_sqrt: U(+-1/sqrt(fan_in))")
    p.add_argument("--expert-scale", type=float, default=1.0)
    p.add_argument("--router-std", type=float, default=None, help="std of router B (proj)")
    p.add_argument("--router-a-std", type=float, default=None, help="std of router A (w_gate)")
    p.add_argument("--router-bias", type=float, default=None, help="constant init of router b")
    p.add_argument("--router-lr-mult", type=float, default=1.0)
    p.add_argument("--router-wd", type=float, default=None, help="weight decay of router params (default --wd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="ModelConfig key=value")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-grads", action="store_true", help="skip the separate LM / MI router gradients")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine, 2 threads spin")
    p.add_argument("--out", default=None, help="write the JSON rows here (default stdout only)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p.parse_args(argv)


def sublayers(model):
    for i, b in enumerate(model.blocks):
        yield f"L{i}/attn", b.attn
        yield f"L{i}/mlp", b.mlpf


def reinit_experts(model, how: str, scale: float, std: float) -> None:
    with torch.no_grad():
        for _, layer in sublayers(model):
            for w in layer.experts.parameters():  # [E, in, out]
                fan_in, fan_out = w.shape[1], w.shape[2]
                if how == "xavier":
                    a = math.sqrt(6.0 / (fan_in + fan_out))
                    w.uniform_(-a, a)
                elif how == "normal_std":
                    w.normal_(0.0, std)
                elif how == "fan_in_sqrt":
                    w.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
                w.mul_(scale)


class Window:
    """Per-sub-layer statistics accumulated over the steps since the last log (hooks)."""

    def __init__(self, model):
        self.subs = dict(sublayers(model))
        self.reset()
        for name, layer in self.subs.items():
            if layer.router.proj is not None:
                layer.router.proj.register_forward_hook(self._pre_hook(name))
            layer.experts.register_forward_hook(self._exp_hook(name))
            layer.register_forward_hook(self._out_hook(name))
            layer.router.register_forward_hook(self._gate_hook(name))
        self.capture = False

    def reset(self):
        self.s = {n: {"ent": 0.0, "tok": 0, "pos_unit": None, "z_sum": 0.0, "z_n": 0, "pos": 0.0,
                      "exp_sq": 0.0, "exp_n": 0, "out_sq": 0.0, "out_n": 0, "gate_sum": 0.0} for n in self.subs}

    def _gate_hook(self, name):
        # dL/dgate_TK = <dL/dy_t, f_m(x_t)>: split into its mean over the k slots of a token ("scale":
        # raising every chosen gate together, which only the full-softmax gate semantics can do by
        # sharpening) and the deviation from that mean ("choice": which chosen expert is better).
        def hook(mod, args, out):
            if not (mod.training and out.weights_TK.requires_grad):
                return

            def grad_hook(g_TK):
                if not self.capture:
                    return
                g = g_TK.detach().float()
                abar = g.mean(1)
                s = self.s[name]
                s["scale"] = float(abar.mean())
                s["scale_abs"] = float(abar.abs().mean())
                s["choice"] = float((g - abar[:, None]).pow(2).mean(1).sqrt().mean())
            out.weights_TK.register_hook(grad_hook)
        return hook

    def _pre_hook(self, name):
        def hook(mod, args, z):
            if not mod.training:
                return
            z = z.detach()
            s = self.s[name]
            pos = (z > 0).any(0)
            s["pos_unit"] = pos if s["pos_unit"] is None else (s["pos_unit"] | pos)
            s["z_sum"] += float(z.sum())
            s["z_n"] += z.numel()
            s["pos"] += float((z > 0).float().sum())
        return hook

    def _exp_hook(self, name):
        def hook(mod, args, y):
            if not mod.training or isinstance(y, tuple):
                return
            s = self.s[name]
            s["exp_sq"] += float(y.detach().float().pow(2).sum())
            s["exp_n"] += y.numel()
        return hook

    def _out_hook(self, name):
        def hook(mod, args, out):
            if not mod.training:
                return
            y = out[0].detach()
            s = self.s[name]
            s["out_sq"] += float(y.float().pow(2).sum())
            s["out_n"] += y.numel()
            r = mod.last_routing
            p = r.probs_TE.float()
            s["ent"] += float(torch.special.entr(p).sum())
            s["tok"] += p.shape[0]
            s["gate_sum"] += float(p.gather(1, r.idx_TK.clamp_min(0)).sum())
        return hook

    def summary(self):
        out = {}
        for n, s in self.s.items():
            E = self.subs[n].num_experts
            row = {"H_rel": s["ent"] / max(1, s["tok"]) / math.log(E),
                   "gate_sum": s["gate_sum"] / max(1, s["tok"]),
                   "out_rms": math.sqrt(s["out_sq"] / max(1, s["out_n"])),
                   "expert_rms": math.sqrt(s["exp_sq"] / max(1, s["exp_n"]))}
            for k in ("scale", "scale_abs", "choice"):
                if k in s:
                    row[k] = s[k]
            if s["pos_unit"] is not None:
                row.update(dead=1.0 - float(s["pos_unit"].float().mean()), z_mean=s["z_sum"] / s["z_n"],
                           pos_frac=s["pos"] / s["z_n"])
            out[n] = row
        return out


def adam_snr(model, opt) -> dict:
    """{sublayer: mean over router params of |m| / sqrt(v)} from AdamW's moments: about 1 when the
    gradient keeps its sign from step to step, about sqrt((1 - b1) / (1 + b1)) = 0.23 for pure noise."""
    out = {}
    for n, l in sublayers(model):
        num, den = 0.0, 0
        for p in l.router.parameters():
            st = opt.state.get(p)
            if not st:
                continue
            r = st["exp_avg"].abs() / st["exp_avg_sq"].sqrt().clamp_min(1e-30)
            num += float(r.sum())
            den += r.numel()
        out[n] = num / max(1, den)
    return out


def router_grads(model, loss_terms: dict, retain: bool = True) -> dict:
    """{term: {sublayer: grad norm over router params}} for each loss term alone."""
    subs = dict(sublayers(model))
    params = [p for _, l in subs.items() for p in l.router.parameters()]
    out = {}
    for term, loss in loss_terms.items():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        it = iter(gs)
        out[term] = {}
        for n, l in subs.items():
            sq = 0.0
            for _ in l.router.parameters():
                g = next(it)
                if g is not None:
                    sq += float(g.pow(2).sum())
            out[term][n] = math.sqrt(sq)
    return out


@torch.no_grad()
def evaluate(model, val: MixtureLoader, n_batches: int):
    model.eval()
    tot, ent = 0.0, {}
    for _ in range(n_batches):
        b = val.next_batch()
        out = model(b["input_ids"])
        tot += float(F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten()))
        for n, l in sublayers(model):
            p = l.last_routing.probs_TE.float()
            ent.setdefault(n, []).append(float(torch.special.entr(p).sum(-1).mean()) / math.log(l.num_experts))
    model.train()
    return tot / n_batches, {n: sum(v) / len(v) for n, v in ent.items()}


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    overrides = {}
    for item in a.overrides:
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    if a.renorm:
        overrides["renormalize_topk"] = True
    cfg = ModelConfig.from_preset(a.preset, **overrides)
    model = MoLM(cfg)
    if a.expert_init != "model" or a.expert_scale != 1.0:
        reinit_experts(model, a.expert_init, a.expert_scale, cfg.init_std)
    with torch.no_grad():
        for _, l in sublayers(model):
            r = l.router
            if a.router_std is not None and r.proj is not None:
                r.proj.weight.normal_(0.0, a.router_std)
            if a.router_a_std is not None:
                r.w_gate.normal_(0.0, a.router_a_std)
            if a.router_bias is not None and r.proj is not None:
                r.proj.bias.fill_(a.router_bias)

    router_ids = {id(p) for _, l in sublayers(model) for p in l.router.parameters()}
    groups = {"decay": [], "no_decay": [], "router_decay": [], "router_no_decay": []}
    for p in model.parameters():
        key = ("router_" if id(p) in router_ids else "") + ("decay" if p.ndim >= 2 else "no_decay")
        groups[key].append(p)
    rwd = a.wd if a.router_wd is None else a.router_wd
    pg = [dict(params=groups["decay"], weight_decay=a.wd, lr_mult=1.0),
          dict(params=groups["no_decay"], weight_decay=0.0, lr_mult=1.0),
          dict(params=groups["router_decay"], weight_decay=rwd, lr_mult=a.router_lr_mult),
          dict(params=groups["router_no_decay"], weight_decay=0.0, lr_mult=a.router_lr_mult)]
    opt = torch.optim.AdamW([g for g in pg if g["params"]], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    src = [DataSource(f"{a.data}/shards/prose", 0.5), DataSource(f"{a.data}/shards/code", 0.5)]
    kw = dict(sources=src, seq_len=a.seq_len, micro_batch_size=a.batch, seed=a.seed, val_fraction=0.01)
    train = MixtureLoader(split="train", **kw)
    val = MixtureLoader(split="val", **kw)
    n_val = sum(len(w) for w in val.windows) // a.batch

    win = Window(model)
    rows, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        f = lr_factor(step, warmup_steps=a.warmup, total_steps=a.steps, min_ratio=0.1)
        for g in opt.param_groups:
            g["lr"] = a.lr * f * g["lr_mult"]
        b = train.next_batch()
        out = model(b["input_ids"])
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), b["labels"].flatten())
        loss = lm + a.mi * out.aux["mi"]
        log_now = step % a.log_every == 0 or step == 1
        grads = None
        if log_now and not a.no_grads:
            win.capture = True  # the LM-only gradient reaches the gates here (MI does not depend on them)
            grads = router_grads(model, {"lm": lm, "mi": out.aux["mi"]})
            win.capture = False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if log_now:
            row = {"step": step, "loss": float(lm.detach()), "gnorm": gnorm, "sub": win.summary()}
            for n, v in adam_snr(model, opt).items():
                row["sub"][n]["adam_snr"] = v
            if grads is not None:
                for term, d in grads.items():
                    for n, v in d.items():
                        row["sub"][n][f"g_{term}"] = v
            rows.append(row)
            if not a.quiet:
                print(json.dumps(row), flush=True)
            win.reset()
    val_loss, val_h = evaluate(model, val, n_val)
    summary = {"summary": True, "args": vars(a), "val_loss": val_loss, "val_H_rel": val_h,
               "final_H_rel": rows[-1]["sub"] and {n: r["H_rel"] for n, r in rows[-1]["sub"].items()},
               "seconds": time.time() - t0}
    print(json.dumps(summary), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            for r in rows + [summary]:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
