"""Expert-parallel equivalence: the tiny MoLM at ep_size 2 (2 gloo ranks, real DeepSpeed engines,
ZeRO 0/1/2, attention experts expert-parallel or replicated) against one process on the same weights
and the same global batch: outputs, loss, aux losses, gradients, grad norm and one clipped SGD step."""

import pytest
import torch
from molm_ds.testing import run_ranks
from tests.parallel._ep_model_workers import engine_worker

CONFIGS = [(0, False), (1, False), (2, False), (2, True), (0, True)]
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(engine_worker, 2, args=(2, CONFIGS))


def _local(full, name, slices):
    if name in slices:
        first, n = slices[name]
        return full[first:first + n]
    return full


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage,replicate", CONFIGS)
def test_ep2_matches_single_process(ranks, stage, replicate):
    for rank, r in enumerate(ranks):
        got = r["results"][(stage, replicate)]
        ref = r["ref_rank"]
        where = f"rank {rank} ZeRO-{stage} replicate_attention={replicate}"
        assert got["n_moe_layers"] == (2 if replicate else 4)
        torch.testing.assert_close(got["logits"], ref["logits"], **TOL, msg=f"{where}: logits")
        torch.testing.assert_close(got["loss"], ref["loss"], **TOL, msg=f"{where}: loss")
        for k in ref["aux"]:
            torch.testing.assert_close(got["aux"][k], ref["aux"][k], **TOL, msg=f"{where}: aux {k}")
        assert set(got["grads"]) == set(r["ref_grads"])
        for n, g in got["grads"].items():
            want = _local(r["ref_grads"][n], n, got["slices"])
            torch.testing.assert_close(g, want, **TOL, msg=f"{where}: grad {n}")
        for n, p in got["after"].items():
            want = _local(r["ref_after"][n], n, got["slices"])
            torch.testing.assert_close(p, want, **TOL, msg=f"{where}: param after step {n}")
        torch.testing.assert_close(torch.as_tensor(float(got["engine_norm"])), r["ref_norm"].float(), **TOL,
                                   msg=f"{where}: engine grad norm")
        if got["my_norm"] is not None:
            torch.testing.assert_close(got["my_norm"], r["ref_norm"].float(), **TOL, msg=f"{where}: grad_norm()")


@pytest.mark.slow
@pytest.mark.distributed
def test_stock_zero0_norm_is_what_guard_plain_optimizer_corrects(ranks):
    """Records why guard_plain_optimizer exists: DeepSpeed's ZeRO-0 fp32 clip averages per-rank norms."""
    got = ranks[0]["results"][(0, False)]
    ref = float(ranks[0]["ref_norm"])
    stock = float(got["stock_norm"])
    # If DeepSpeed fixes this, guard_plain_optimizer becomes redundant (still correct): revisit then.
    assert abs(stock - ref) > 1e-3 * ref, f"stock ZeRO-0 norm {stock} equals the true norm {ref}"
