"""A resume must continue the run it names: changes that break the exact data order (global batch,
mixture, seq_len, seed) are refused before the model is built unless allow_data_change says so, and
``resume: auto`` that finds no checkpoint over an earlier run's files is refused like a fresh start."""

from __future__ import annotations

import os
import shutil

import pytest

from molm_ds.errors import CheckpointError, ConfigError
from molm_ds.train import load_job
from molm_ds.train.loop import train
from molm_ds.train.recipe import Recipe
from molm_ds.testing import TINY_JOB, read_metrics, tiny_job_overrides

pytestmark = pytest.mark.slow


def job(shard, run_dir, *extra):
    return load_job(TINY_JOB, tiny_job_overrides(shard, run_dir) + [
        "training.eval_interval=0", "monitor.tensorboard=false"] + list(extra))


@pytest.fixture(scope="module")
def base(shard, tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "run"
    train(job(shard, d, "training.steps=2"))
    return d


@pytest.fixture
def run_copy(base, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base, d)
    return d


@pytest.mark.parametrize("change, needle", [
    ("training.micro_batch_size=4", "global batch 4 -> 8"),
    ("training.grad_accum_steps=1", "global batch 4 -> 2"),
    ("data.seq_len=16", "data.seq_len 32 -> 16"),
    ("training.seed=8", "training.seed 7 -> 8"),
])
def test_a_resume_that_changes_the_data_order_is_refused_before_the_build(shard, run_copy, change, needle,
                                                                         monkeypatch):
    monkeypatch.setattr(Recipe, "build_model", lambda self: pytest.fail("the model was built before the error"))
    with pytest.raises(CheckpointError, match=f"{needle}.*--allow-data-change"):
        train(job(shard, run_copy, "training.steps=4", "resume=auto", change))


def test_allow_data_change_continues_weights_with_a_fresh_data_order(shard, run_copy):
    s = train(job(shard, run_copy, "training.steps=3", "resume=auto", "training.micro_batch_size=4",
                  "allow_data_change=true"))
    assert s["step"] == 3 and s["steps_run"] == 1
    assert sorted(read_metrics(run_copy)) == [1, 2, 3]


def test_resume_auto_without_a_checkpoint_over_an_earlier_run_is_refused(shard, run_copy):
    shutil.rmtree(os.path.join(run_copy, "checkpoints"))
    with pytest.raises(ConfigError, match="holds an earlier run.*--resume auto found no complete checkpoint.*--overwrite"):
        train(job(shard, run_copy, "training.steps=2", "resume=auto"))
    assert read_metrics(run_copy), "the earlier run's metrics are kept"


def test_other_training_changes_resume_with_a_word(shard, run_copy, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert train(job(shard, run_copy, "training.steps=3", "resume=auto", "training.lr=1.0e-3"))["step"] == 3
    assert "training.lr 0.003 -> 0.001" in caplog.text
