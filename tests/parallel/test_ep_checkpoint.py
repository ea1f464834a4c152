"""Expert checkpoints in DeepSpeed's layout, one file per global expert: saved at ep_size 2, every
expert found under its global id, resumed at ep_size 2, and the weights loaded at ep_size 1 and 4
(outputs then equal a single process holding the saved weights; training continues)."""

import pytest
import torch
from tests.parallel._ep_ckpt_workers import TAG, load_worker, save_worker
from molm_ds.testing import run_ranks
from tests.parallel._ep_model_workers import batches, fresh_model, tiny_config

STAGE = 2  # ZeRO-2: also checks that loading weights refreshes ZeRO's fp32 master copy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    return d, run_ranks(save_worker, 2, args=(d, STAGE))


def _full_weights(save_ranks):
    """Stitch the saved per-rank parameters into full (single-process) tensors."""
    full = {}
    for r in save_ranks:
        for n, (t, first) in r["saved"].items():
            if first is None:
                full[n] = t
            else:
                full.setdefault(n, {})[first] = t
    return {n: (torch.cat([v[k] for k in sorted(v)]) if isinstance(v, dict) else v) for n, v in full.items()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_every_expert_file_holds_its_global_expert(saved):
    _, ranks = saved
    full = _full_weights(ranks)
    r0 = ranks[0]
    layers = r0["layers"]  # (name, kind, E, L)
    assert [l[3] for l in layers] == list(range(len(layers))) and len(layers) == 4
    files = r0["files"]
    assert set(files) == {(L, e) for (_, _, E, L) in layers for e in range(E)}
    for name, kind, E, L in layers:
        wnames = ("w_q", "w_o") if kind == "attn" else ("w1", "w2")
        for e in range(E):
            sd = files[(L, e)]
            want_keys = {f"{name}.experts.deepspeed_moe.experts.deepspeed_experts.{e}.{w}" for w in wnames}
            assert set(sd) == want_keys, (L, e, sorted(sd))
            for w in wnames:
                key = f"{name}.experts.deepspeed_moe.experts.deepspeed_experts.{e}.{w}"
                torch.testing.assert_close(sd[key], full[f"{name}.experts.{w}"][e], rtol=0, atol=0)
    # expert weights live only in the expert files
    assert not any("experts" in k for k in r0["main_keys"])
    assert "lm_head.weight" in r0["main_keys"]


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_same_ep_size_restores_weights_and_client_state(saved):
    _, ranks = saved
    for r in ranks:
        assert r["client"]["note"] == "ep-test" and r["global_steps"] == 1
        for n, (t, first) in r["saved"].items():
            torch.testing.assert_close(r["reloaded"][n][0], t, rtol=0, atol=0, msg=n)
            assert r["reloaded"][n][1] == first


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,stage", [(1, 2), (4, 0)])  # ZeRO-2 at 1 rank: fp32 master refreshed; ZeRO-0 keeps 4 ranks light
def test_weights_saved_at_ep2_load_at_other_ep_sizes(saved, world, stage):
    d, save_ranks = saved
    full = _full_weights(save_ranks)
    ranks = run_ranks(load_worker, world, args=(d, stage))
    # single-process reference holding the saved weights
    ref = fresh_model(tiny_config())
    ref.load_state_dict(full, strict=False)
    assert set(full) == {n for n, _ in ref.named_parameters()}
    for rank, r in enumerate(ranks):
        for n, (t, first) in r["loaded"].items():
            want = full[n] if first is None else full[n][first:first + t.shape[0]]
            torch.testing.assert_close(t, want, rtol=0, atol=0, msg=f"ep{world} rank {rank}: {n}")
            torch.testing.assert_close(r["after"][n][0], want, rtol=0, atol=0, msg=f"ep{world} rank {rank} after step: {n}")
        with torch.no_grad():
            out = ref(r["ids"])
        torch.testing.assert_close(r["logits"], out.logits, rtol=1e-4, atol=1e-6, msg=f"ep{world} rank {rank}: logits")
        assert torch.equal(r["ids"], batches(world, 512)[rank])
