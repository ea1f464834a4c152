"""Every checkpoint records the model it holds (config and MoE sub-layers), so readers need neither the
trainer nor the preset; checkpoints written before the record still load (from their job.yaml)."""

import json
import os
import subprocess
import sys

import torch
import yaml

from molm_ds import checkpoint as ckpt
from molm_ds.checkpoint import layout, marker
from molm_ds.config import ModelConfig
from molm_ds.continual import grow_experts
from molm_ds.model import MoLM


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _write(tmp_path, model, job=None):
    d = str(tmp_path / "ckpt")
    ckpt.write_model(model, job or {"name": "t", "model": {"preset": "tiny"}}, d, tag=ckpt.tag_for(3), kind="imported")
    return d, ckpt.tag_for(3)


def _strip_record(d, tag):
    """The tag as molm-ds wrote it before records existed: no model.json, a marker without it."""
    tag_dir = os.path.join(d, tag)
    os.remove(os.path.join(tag_dir, layout.MODEL_RECORD))
    old = marker.read_marker(d, tag)
    marker.mark_complete(tag_dir, {"kind": old["kind"], "step": old["step"]},
                         marker.digests(tag_dir, layout.tag_files(tag_dir)))


def test_the_record_holds_the_config_and_the_sublayers(tmp_path):
    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny", n_mlp_experts=6, ffd_hidden=96))
    d, tag = _write(tmp_path, model)
    with open(os.path.join(d, tag, layout.MODEL_RECORD)) as f:
        record = json.load(f)
    assert ModelConfig(**record["config"]) == model.config
    want = [(s.name, s.layer, s.kind, int(s.module.num_experts)) for s in model.moe_sublayers()]
    assert [(s["name"], s["layer"], s["kind"], s["num_experts"]) for s in record["sublayers"]] == want
    assert {s["kind"]: s["stacked"] for s in record["sublayers"]} == {"attn": ["w_q", "w_o"], "mlp": ["w1", "w2"]}
    assert all(s["expert_parallel"] for s in record["sublayers"])  # a weights-only tag: experts in expert files
    assert ckpt.verify(d, tag) is None  # the record is one of the files the marker guards


def test_a_reader_needs_neither_the_trainer_nor_the_preset(tmp_path):
    torch.manual_seed(1)
    model = MoLM(ModelConfig.from_preset("tiny", n_layer=3, n_att_experts=2, k_att=1))
    # the job names a preset that builds another model: only the record says what the tag holds
    d, tag = _write(tmp_path, model)
    with open(os.path.join(d, tag, layout.JOB_FILE), "w") as f:
        yaml.safe_dump({"name": "t", "model": {"preset": "tiny"}}, f)
    _rehash(d, tag)
    # what evaluate / generate / export / prune load through (molm_ds.loading), and the plain reader
    code = ("import sys, torch\nfrom molm_ds import checkpoint as ckpt\nfrom molm_ds.loading import load_source\n"
            f"m = load_source({d!r}).model\n"
            f"assert m.state_dict().keys() == ckpt.load_model({d!r}).state_dict().keys()\n"
            "bad = sorted(n for n in sys.modules if n.startswith(('molm_ds.train', 'deepspeed')))\n"
            "assert not bad, bad\n"
            f"torch.save(m.state_dict(), {str(tmp_path / 'sd.pt')!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = torch.load(tmp_path / "sd.pt")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items()) and got.keys() == model.state_dict().keys()


def _rehash(d, tag):
    tag_dir = os.path.join(d, tag)
    old = marker.read_marker(d, tag)
    marker.mark_complete(tag_dir, {"kind": old["kind"], "step": old["step"]},
                         marker.digests(tag_dir, layout.tag_files(tag_dir)))


def test_a_checkpoint_without_the_record_loads_from_its_job(tmp_path):
    """Written the old way: a trainer-style job.yaml (base model section + continual section) and no
    record; the reader grows the base by the continual section, as before."""
    torch.manual_seed(2)
    base = ModelConfig.from_preset("tiny", n_mlp_experts=6)
    model = grow_experts(MoLM(base), attention=2, mlp=2, seed=5)
    d, tag = _write(tmp_path, model)
    job = {"name": "t", "model": {"preset": "tiny", "overrides": {"n_mlp_experts": 6}},
           "continual": {"attention": 2, "mlp": 2}, "parallel": {"ep_size": 2, "replicate_attention_experts": True}}
    with open(os.path.join(d, tag, layout.JOB_FILE), "w") as f:
        yaml.safe_dump(job, f)
    _strip_record(d, tag)
    assert not os.path.exists(os.path.join(d, tag, layout.MODEL_RECORD)) and ckpt.verify(d, tag) is None
    assert ckpt.model_config(d, tag) == model.config
    assert _same_weights(ckpt.load_model(d), model)
    record = ckpt.record.read_model_record(d, tag)
    assert {s["kind"]: s["expert_parallel"] for s in record["sublayers"]} == {"attn": False, "mlp": True}
    torch.testing.assert_close(ckpt.read_fp32_state(d, tag), {k: v.float() for k, v in model.state_dict().items()},
                               rtol=0, atol=0)
