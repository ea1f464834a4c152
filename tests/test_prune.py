"""molm_ds.prune: frequencies (vs brute force, 1 vs 2 gloo ranks), expert removal (vs hand-built
references), pruned checkpoints and Hugging Face export round trips, the finetune loss weight."""

import os

import pytest
import torch
import torch.nn.functional as F

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.monitor import LoadSums, SubLayer
from molm_ds.prune import (
    activation_frequencies, expert_load_sums, experts_to_keep, normalized_frequencies, param_count, prune_model,
    prune_model_reference_layer, save_pruned_checkpoint,
)

V = 512


def _cfg(**kw):
    # n_head=1, K = V = LN(x): the released ModuleFormer layout (HF export needs it)
    return ModelConfig.from_preset("tiny", n_head=1, **kw)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoLM(_cfg(**kw)).eval()


def _batches(n=3, B=2, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]


def _sums(counts, tokens=None):
    c = torch.tensor(counts, dtype=torch.float64)
    s = LoadSums.zeros(len(counts))
    s.counts_E = c
    s.tokens = torch.tensor(float(tokens if tokens is not None else c.sum()), dtype=torch.float64)
    return s


# ---- thresholds ------------------------------------------------------------------------------------
def test_keep_by_normalised_frequency_hand_computed():
    a, m = SubLayer(0, "attn"), SubLayer(0, "mlp")
    sums = {a: _sums([10, 1, 0, 5], tokens=8), m: _sums([2, 2, 4, 0], tokens=4)}
    f = activation_frequencies(sums)
    assert torch.allclose(f[a], torch.tensor([10, 1, 0, 5], dtype=torch.float64) / 8)
    nf = normalized_frequencies(sums)
    assert torch.allclose(nf[a], torch.tensor([1.0, 0.1, 0.0, 0.5], dtype=torch.float64))
    assert torch.allclose(nf[m], torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=torch.float64))
    assert experts_to_keep(sums, tau=0.0) == {a: [0, 1, 2, 3], m: [0, 1, 2, 3]}
    assert experts_to_keep(sums, tau=0.1) == {a: [0, 1, 3], m: [0, 1, 2]}
    assert experts_to_keep(sums, tau=0.6) == {a: [0], m: [2]}
    assert experts_to_keep(sums, tau=1.0) == {a: [0], m: [2]}
    with pytest.raises(ValueError, match="tau"):
        experts_to_keep(sums, tau=1.5)
    with pytest.raises(ValueError, match="no tokens"):
        experts_to_keep({a: _sums([0, 0, 0, 0], tokens=0)}, tau=0.1)


def test_frequencies_match_brute_force_routing():
    """Counts from the monitor's sums == top-k of the router's softmax recomputed from each sub-layer's
    captured input (bincount by hand)."""
    model = _model()
    inputs = {}
    handles = []
    for i, blk in enumerate(model.blocks):
        for kind, m in (("attn", blk.attn), ("mlp", blk.mlpf)):
            def pre(mod, args, key=SubLayer(i, kind)):
                inputs.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            handles.append(m.register_forward_pre_hook(pre))
    batches = _batches()
    sums = expert_load_sums(model, batches)
    for h in handles:
        h.remove()
    for key, xs in inputs.items():
        layer = getattr(model.blocks[key.layer], "attn" if key.kind == "attn" else "mlpf")
        brute = torch.zeros(layer.num_experts, dtype=torch.float64)
        for x in xs:
            probs = torch.softmax(layer.router.logits(x).float(), -1)
            for row in probs.topk(layer.router.top_k, -1).indices.tolist():
                for e in row:
                    brute[e] += 1
        assert torch.equal(sums[key].counts_E, brute), key
        assert float(sums[key].tokens) == sum(b.numel() for b in batches)


# ---- surgery ---------------------------------------------------------------------------------------
def test_tau_zero_keeps_logits_identical():
    model = _model()
    keep = experts_to_keep(expert_load_sums(model, _batches()), tau=0.0)
    pruned = prune_model(model, keep)
    x = _batches(1, B=3, T=17, seed=5)[0]
    assert torch.equal(pruned(x).logits, model(x).logits)
    assert param_count(pruned) == param_count(model)


@pytest.mark.parametrize("ids", [[1, 3], [2], [0, 1, 3]])
def test_removed_mlp_experts_change_output_only_through_softmax(ids):
    """Pruned MoE MLP == hand-built reference: softmax over the kept rows of A, top-k capped, gates
    times the kept experts' own weights, token by token."""
    model = _model(seed=3)
    pruned = prune_model(model, {SubLayer(1, "mlp"): ids})
    assert pruned.blocks[1].mlpf.num_experts == len(ids)
    assert pruned.blocks[1].mlpf.router.top_k == min(2, len(ids))
    assert pruned.blocks[0].mlpf.num_experts == 4 and pruned.blocks[1].attn.num_experts == 4
    x = torch.randn(2, 7, 64)
    y, _ = pruned.blocks[1].mlpf(x)
    ref = prune_model_reference_layer(model.blocks[1].mlpf, ids, x.reshape(-1, 64)).view(2, 7, 64)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # the dropped experts' weights are gone, the kept ones are the same tensors' rows
    assert torch.equal(pruned.blocks[1].mlpf.experts.w1, model.blocks[1].mlpf.experts.w1[ids])
    assert torch.equal(pruned.blocks[1].mlpf.router.w_gate, model.blocks[1].mlpf.router.w_gate[ids])


def _mask_router(layer, removed):
    """Make an unpruned sub-layer ignore experts `removed`: their logits -> -inf (softmax renormalises)."""
    orig = layer.router.logits

    def logits(x_TD):
        out = orig(x_TD).clone()
        out[:, removed] = float("-inf")
        return out

    layer.router.logits = logits


def test_pruned_model_equals_masked_softmax_model():
    """Whole model, attention and MLP sub-layers pruned differently per layer: equal to the unpruned
    model whose routers give the removed experts probability 0 (the only other change)."""
    model = _model(seed=4)
    keep = {SubLayer(0, "attn"): [0, 2, 3], SubLayer(0, "mlp"): [1], SubLayer(1, "attn"): [3],
            SubLayer(1, "mlp"): [0, 1, 2, 3]}
    pruned = prune_model(model, keep)
    assert pruned.config.att_experts_per_layer == (3, 1) and pruned.config.mlp_experts_per_layer == (1, 4)
    assert param_count(pruned) == pruned.config.total_params
    for key, ids in keep.items():
        layer = getattr(model.blocks[key.layer], "attn" if key.kind == "attn" else "mlpf")
        _mask_router(layer, [e for e in range(4) if e not in ids])
    x = _batches(1, B=2, T=13, seed=9)[0]
    torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_prune_rejects_bad_keep():
    model = _model()
    with pytest.raises(ValueError, match="at least one"):
        prune_model(model, {SubLayer(0, "mlp"): []})
    with pytest.raises(ValueError, match="ascending"):
        prune_model(model, {SubLayer(0, "mlp"): [3, 1]})
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        prune_model(model, {SubLayer(0, "mlp"): [0, 4]})
    with pytest.raises(ValueError, match="n_layer"):
        _cfg(mlp_experts_per_layer=(4,))
    with pytest.raises(ValueError, match="in \\[1, 4\\]"):
        _cfg(mlp_experts_per_layer=(4, 5))


# ---- checkpoints -----------------------------------------------------------------------------------
def test_pruned_checkpoint_and_hf_round_trip(tmp_path):
    import yaml

    from molm_ds.checkpoint import load_model as load_checkpoint_model
    from molm_ds.interop import load_moduleformer, save_moduleformer
    from molm_ds.train.job import ModelSection

    model = _model(seed=6, kv_proj=False)
    keep = {SubLayer(0, "attn"): [1, 2], SubLayer(1, "mlp"): [0]}
    pruned = prune_model(model, keep)
    job = {"name": "src", "model": {"preset": "tiny", "overrides": {"n_head": 1}}, "init_from": "somewhere"}
    d = save_pruned_checkpoint(pruned, job, str(tmp_path / "ckpt"), tag="step_00000007", info={"tau": 0.5})
    files = sorted(os.listdir(d))
    assert "COMPLETE" in files and "job.yaml" in files
    assert sum(f.startswith("layer_") for f in files) == 2 + 4 + 4 + 1  # one file per kept expert
    saved = yaml.safe_load(open(os.path.join(d, "job.yaml")))
    assert "init_from" not in saved
    assert ModelSection(**saved["model"]).build() == pruned.config  # a job's model section rebuilds it
    x = _batches(1, B=2, T=11, seed=2)[0]
    for loaded in (load_checkpoint_model(str(tmp_path / "ckpt")), load_checkpoint_model(d)):
        assert loaded.config == pruned.config
        assert torch.equal(loaded.eval()(x).logits, pruned(x).logits)
    save_moduleformer(pruned, tmp_path / "hf")
    hf = load_moduleformer(tmp_path / "hf")
    assert hf.config.att_experts_per_layer == (2, 4) and hf.config.mlp_experts_per_layer == (4, 1)
    assert torch.equal(hf(x).logits, pruned(x).logits)


def test_finetune_section_adds_to_load_concentration_weight():
    from molm_ds.train.job import JobConfigError, job_from_dict
    from molm_ds.train.recipe import Recipe

    def loss_weights(job):
        return Recipe(job).loss_weights()

    raw = {"data": {"sources": [{"path": "x"}], "seq_len": 8},
           "training": {"steps": 1, "micro_batch_size": 1, "loss_weights": {"mi": 0.02, "load_concentration": 0.5}}}
    assert loss_weights(job_from_dict(raw))["load_concentration"] == 0.5
    w = loss_weights(job_from_dict({**raw, "finetune": {"load_concentration_weight": 0.25}}))
    assert w == {"mi": 0.02, "load_concentration": 0.75, "switch": 0.0, "z": 0.0}
    assert job_from_dict({**raw, "finetune": {}}).finetune.load_concentration_weight == 0.001
    with pytest.raises(JobConfigError, match="load_concentration_weight"):
        job_from_dict({**raw, "finetune": {"weight": 1.0}})


def test_shipped_finetune_configs_load():
    from pathlib import Path

    from molm_ds.train.job import load_job

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("finetune_*.yaml"))
    assert len(files) >= 3
    for f in files:
        job = load_job(f)  # validates (the init_from checkpoint is checked only when the job runs)
        if f.name.startswith("finetune_code_"):
            assert job.finetune is not None and job.init_from is not None and job.data.sources[0].path.endswith("code")


# ---- 2 ranks ---------------------------------------------------------------------------------------
def _rank_worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _model(seed=8)
    batches = _batches(n=3, B=4, T=9, seed=11)
    mine = [b[rank * 2:(rank + 1) * 2] for b in batches]  # this rank's rows of every global batch
    sums = expert_load_sums(model, mine)
    if rank == 0:
        torch.save({k.tag: s.flatten() for k, s in sums.items()}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "two.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    one = expert_load_sums(_model(seed=8), _batches(n=3, B=4, T=9, seed=11))
    two = {k: torch.load(out)[k.tag] for k in one}
    for k, s in one.items():
        torch.testing.assert_close(two[k], s.flatten(), rtol=1e-6, atol=1e-6)  # prob sums: fp32 forwards of other shapes
        assert torch.equal(two[k][: s.num_experts], s.counts_E)
    keep_two = experts_to_keep({k: LoadSums.unflatten(v, one[k].num_experts) for k, v in two.items()}, tau=0.3)
    assert keep_two == experts_to_keep(one, tau=0.3)


@pytest.mark.slow
def test_prune_script_then_trainer_init_from(tmp_path):
    """launch/prune.py on a checkpoint -> pruned checkpoint -> a finetune job starts from it (init_from)
    with the per-layer counts in its model section, trains a step and saves."""
    import json
    import subprocess
    import sys

    import yaml

    from molm_ds.testing import write_shard

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shard = write_shard(tmp_path / "shard", n_docs=40, doc_len=200)
    src = {"model": {"preset": "tiny", "overrides": {"n_head": 1}}, "data": {"seq_len": 16}}
    save_pruned_checkpoint(_model(seed=12), src, str(tmp_path / "src"), tag="step_00000003")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = tmp_path / "pruned"
    subprocess.run([sys.executable, "launch/prune.py", "--checkpoint", str(tmp_path / "src"), "--data", shard,
                    "--tau", "0.9", "--out", str(out), "--batches", "2", "--eval-batches", "1", "--batch-size", "2"],
                   cwd=repo, env=env, check=True)
    info = json.loads((out / "prune.json").read_text())
    assert info["params"] < info["unpruned"]["params"] and (out / "hf" / "config.json").is_file()
    counts = {"att_experts_per_layer": info["att_experts_per_layer"], "mlp_experts_per_layer": info["mlp_experts_per_layer"]}
    job = {"name": "t", "run_dir": str(tmp_path / "run"), "init_from": str(out / "checkpoints"),
           "model": {"preset": "tiny", "overrides": {"n_head": 1, **counts}},
           "data": {"sources": [{"path": shard}], "seq_len": 16, "eval_batches": 1},
           "training": {"steps": 1, "micro_batch_size": 2}, "finetune": {"load_concentration_weight": 0.001},
           "monitor": {"tensorboard": False}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "launch/pretrain.py", "--config", str(tmp_path / "job.yaml")], cwd=repo, env=env,
                   check=True)
    from molm_ds.checkpoint import load_model as load_checkpoint_model

    trained = load_checkpoint_model(str(tmp_path / "run" / "checkpoints"))
    assert [trained.config.att_experts_per_layer, trained.config.mlp_experts_per_layer] == list(map(tuple, counts.values()))


# ---- REAP criterion and matched counts ---------------------------------------------------------------
@pytest.mark.parametrize("renorm", [False, True])
def test_reap_scores_match_single_expert_layers(renorm):
    """Reference: f_m(x) is the output of the sub-layer pruned to expert m alone (its softmax over one
    expert is 1), on the inputs the full model gave that sub-layer; S_m = mean over routed tokens of g * |f|."""
    from molm_ds.prune import reap_scores

    model = _model(seed=3, renormalize_topk=renorm)
    batches = _batches(n=2)
    got = reap_scores(model, batches)
    subs = {SubLayer(i, k): getattr(b, {"attn": "attn", "mlp": "mlpf"}[k])
            for i, b in enumerate(model.blocks) for k in ("attn", "mlp")}
    want = {k: torch.zeros(m.num_experts, dtype=torch.float64) for k, m in subs.items()}
    cnt = {k: torch.zeros(m.num_experts, dtype=torch.float64) for k, m in subs.items()}
    for ids in batches:
        xs = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, key=key: xs.__setitem__(key, a[0])) for key, m in subs.items()]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for key, m in subs.items():
            rec = m.last_routing
            for e in range(m.num_experts):
                single = prune_model(model, {key: [e]})
                layer = getattr(single.blocks[key.layer], {"attn": "attn", "mlp": "mlpf"}[key.kind])
                with torch.no_grad():
                    y = layer(xs[key])[0].reshape(-1, xs[key].shape[-1])
                for t in range(rec.idx_TK.shape[0]):
                    chosen = rec.idx_TK[t].tolist()
                    if e not in chosen:
                        continue
                    p = rec.probs_TE[t]
                    g = p[e] / p[chosen].sum() if renorm else p[e]
                    want[key][e] += float(g) * float(y[t].norm())
                    cnt[key][e] += 1
    for key in subs:
        ref = torch.where(cnt[key] > 0, want[key] / cnt[key].clamp(min=1), torch.zeros_like(want[key]))
        assert torch.allclose(got[key], ref, rtol=1e-4, atol=1e-6), (key, got[key], ref)


def test_keep_count_takes_the_top_scores_and_matches_a_pruned_config():
    from molm_ds.prune import experts_to_keep_count, keep_counts_of

    a, m = SubLayer(0, "attn"), SubLayer(1, "mlp")
    keep = experts_to_keep_count({a: torch.tensor([0.1, 0.5, 0.5, 0.2]), m: torch.tensor([3.0, 1.0, 2.0, 0.0])},
                                 {a: 2, m: 3})
    assert keep == {a: [1, 2], m: [0, 1, 2]}
    with pytest.raises(ValueError, match="keep 0 experts"):
        experts_to_keep_count({a: torch.zeros(4)}, {a: 0})
    small = prune_model(_model(), {a: [1, 2], m: [0, 1, 2]})
    counts = keep_counts_of(small.config)
    assert counts[a] == 2 and counts[m] == 3 and counts[SubLayer(0, "mlp")] == 4


def test_prune_script_uses_the_job_split_and_matches_counts(tmp_path):
    """The held-out windows follow the checkpoint job's fractions and split_by (not the loader default);
    --match prunes another model to the same per-layer counts, by frequency or REAP."""
    import json
    import subprocess
    import sys

    from molm_ds.data import DataSource, MixtureLoader
    from molm_ds.testing import write_shard

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shard = write_shard(tmp_path / "shard", n_docs=40, doc_len=200)
    data = {"seq_len": 16, "val_fraction": 0.2, "test_fraction": 0.2, "split_by": "document"}
    save_pruned_checkpoint(_model(seed=12), {"model": {"preset": "tiny", "overrides": {"n_head": 1}}, "data": data},
                           str(tmp_path / "src"), tag="step_00000003")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    common = ["--checkpoint", str(tmp_path / "src"), "--data", shard, "--batches", "2", "--eval-batches", "2",
              "--batch-size", "2", "--split", "test"]
    subprocess.run([sys.executable, "launch/prune.py", *common, "--sweep", "0.6", "--out", str(tmp_path / "a")],
                   cwd=repo, env=env, check=True)
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    test = MixtureLoader([DataSource(shard)], seq_len=16, micro_batch_size=2, seed=0, split="test", val_fraction=0.2,
                         test_fraction=0.2, split_by="document")
    assert sweep["unpruned"]["scored"]["distinct_windows"] == len(test.windows[0])
    assert sweep["unpruned"]["scored"]["split_by"] == "document"
    for crit in ("frequency", "reap"):
        out = tmp_path / crit
        subprocess.run([sys.executable, "launch/prune.py", *common, "--match", str(tmp_path / "a" / "sweep.json"),
                        "--criterion", crit, "--out", str(out)], cwd=repo, env=env, check=True)
        m = json.loads((out / "match.json").read_text())
        assert [(r["att_experts_per_layer"], r["mlp_experts_per_layer"]) for r in m["rows"]] == \
            [(r["att_experts_per_layer"], r["mlp_experts_per_layer"]) for r in sweep["rows"]]
        if crit == "frequency":  # the same model, the same score: the same experts, the same perplexity
            assert m["rows"][0]["ppl"] == pytest.approx(sweep["rows"][0]["ppl"], rel=1e-6)
