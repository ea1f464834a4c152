"""Bad continual / init_from sections fail before any work, with a message that says what to change."""

import pytest

from molm_ds.train import JobConfigError, load_job
from molm_ds.testing import TINY_JOB

CL = "continual={attention: 2, mlp: 2, strategy: new_only}"


@pytest.mark.parametrize("overrides, needle", [
    (["init_from=x", "continual={attention: -1, mlp: 2}"], "continual.attention=-1.*must be >= 0"),
    (["init_from=x", "continual={mlp: 2, strategy: everything}"], "continual.strategy: Input should be 'full_router' or 'new_only'"),
    (["init_from=x", "continual={mlp: 0}"], "add at least one expert"),
    ([CL], "continual needs init_from"),
    (["init_from=x", "continual={mlp: 2, train_others: true}"], "contradicts strategy new_only"),
    (["init_from=x", "continual={mlp: 1}", "parallel.ep_size=2"], r"continual.mlp=1: 4 \+ 1 = 5 mlp experts .* among \[0, 2, 4\]"),
    (["init_from=x", "continual={attention: 1, mlp: 2}", "parallel.ep_size=2"], "continual.attention=1.*replicate_attention_experts"),
    (["init_from=x", "continual={mlp: 2, lr: {experts: 1.0}}"], "continual.lr.experts: unknown key; did you mean 'new_experts'. valid keys here: new_experts, router, others"),
])
def test_bad_sections_are_refused_at_load(overrides, needle):
    with pytest.raises(JobConfigError, match=needle):
        load_job(TINY_JOB, overrides)


def test_good_section_grows_the_trained_model_config():
    job = load_job(TINY_JOB, ["init_from=x", "continual={attention: 2, mlp: 2}", "parallel.ep_size=2"])
    assert job.model.build().n_mlp_experts == 4
    cfg = job.build_model_config()
    assert (cfg.n_att_experts, cfg.n_mlp_experts) == (6, 6)
    job = load_job(TINY_JOB, ["init_from=x", "continual={attention: 1, mlp: 2}", "parallel.ep_size=2",
                              "parallel.replicate_attention_experts=true"])
    assert job.build_model_config().n_att_experts == 5


def test_shipped_continual_configs_load():
    from molm_ds.testing import REPO

    files = sorted((REPO / "configs").glob("continual_*.yaml"))
    assert len(files) >= 3
    for f in files:
        job = load_job(f)
        if job.continual is not None:
            assert job.init_from and job.continual.eval.old and job.continual.eval.new
