"""Every mistake a user can make at the command line ends in one `error:` line on stderr, exit code 2,
no traceback, before any model is built (MOLM_DS_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from molm_ds.testing import REPO, TINY_JOB, tiny_job_overrides, write_ds_config

pytestmark = pytest.mark.slow


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"launch_{script}", REPO / "launch" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def other_model_ckpt(tmp_path_factory):
    """A weights-only checkpoint of a model the tiny job does not describe (1 layer instead of 2)."""
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds import checkpoint as ckpt

    d = tmp_path_factory.mktemp("other")
    ckpt.write_model(MoLM(ModelConfig.from_preset("tiny", n_layer=1)), {}, str(d), tag="step_00000001", kind="test")
    return str(d)


def run_cli(script: str, argv: list[str], capsys, monkeypatch) -> str:
    """Run launch/<script>.py main through the entry-point convention in this process; return stderr."""
    from molm_ds import cli
    from molm_ds.train.recipe import Recipe

    monkeypatch.delenv("MOLM_DS_DEBUG", raising=False)
    monkeypatch.setattr(Recipe, "build_model", lambda self: pytest.fail("the model was built before the error"))
    with pytest.raises(SystemExit) as exc:
        cli.run(_load(script).main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def job_args(shard, tmp_path, *sets):
    args = ["--config", str(TINY_JOB)]
    for s in tiny_job_overrides(shard, tmp_path / "run") + list(sets):
        args += ["--set", s]
    return args


def test_pretrain_user_errors(shard, tmp_path, capsys, monkeypatch, other_model_ckpt):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training:\n  steps: [1, 2\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text(TINY_JOB.read_text() + "training:\n  steps: 9\n")
    typo = write_ds_config(tmp_path / "typo.json", zero_optimisation={"stage": 2})
    sub_typo = write_ds_config(tmp_path / "subtypo.json", zero_optimization={"stage": 2, "reduce_bucket_sise": 5})
    cases = [
        (["--config", "nowhere.yaml"], "job file nowhere.yaml not found"),
        (["--config", str(bad_yaml)], "line 3"),
        (["--config", str(dup)], "duplicate key 'training'"),
        (job_args(shard, tmp_path, f"deepspeed.config={typo}"), "did you mean 'zero_optimization'"),
        (job_args(shard, tmp_path, f"deepspeed.config={sub_typo}"), "did you mean 'reduce_bucket_size'"),
        (job_args(shard, tmp_path, "deepspeed.config=ds_configs/nope.json"), "shipped configs"),
        (job_args(shard, tmp_path, "parallel.ep_size=2"), "does not divide the world size 1"),
        (job_args(shard, tmp_path, "parallel.ep_size=3"), "does not divide model n_mlp_experts=4"),
        (job_args(shard, tmp_path) + ["--resume", str(tmp_path / "nowhere")], "does not exist"),
        (job_args(shard, tmp_path, f"init_from={tmp_path / 'nowhere'}"), "init_from: "),
        (job_args(shard, tmp_path, f"init_from={other_model_ckpt}"), "holds a different model"),
        (job_args(shard, tmp_path, "training.stpes=3"), "did you mean 'steps'"),
        (job_args(shard, tmp_path, "training.steps"), "must look like section.key=value"),
        (job_args(shard, tmp_path, "model.overrides={vocab_size: 100}"), "vocab_size >= 512"),
        (job_args(shard, tmp_path, "prune={tau: 0.1}"), "launch/prune.py"),
        (["--config"], "expected one argument"),
    ]
    for argv, needle in cases:
        line = run_cli("pretrain", argv, capsys, monkeypatch)
        assert needle in line, (argv, line)


def test_resume_of_a_weights_only_checkpoint_says_use_init_from(shard, tmp_path, capsys, monkeypatch):
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds import checkpoint as ckpt

    d = tmp_path / "pruned"
    ckpt.write_model(MoLM(ModelConfig.from_preset("tiny")), {}, str(d), tag="step_00000002", kind="pruned")
    line = run_cli("pretrain", job_args(shard, tmp_path) + ["--resume", str(d)], capsys, monkeypatch)
    assert "weights only" in line and "init_from" in line


def test_prune_user_errors(shard, tmp_path, capsys, monkeypatch, other_model_ckpt):
    out = ["--out", str(tmp_path / "p")]
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere"), "--data", shard, "--tau", "0.1"] + out, "does not exist"),
        (["--checkpoint", other_model_ckpt, "--data", shard, "--tau", "1.5"] + out, "must be in [0, 1]"),
        (["--checkpoint", other_model_ckpt, "--data", shard, "--sweep", "0.1,x"] + out, "comma-separated numbers"),
        (["--checkpoint", other_model_ckpt, "--data", shard] + out, "give --tau"),
        (["--checkpoint", other_model_ckpt, "--data", str(tmp_path / "nodata"), "--tau", "0.1"] + out, "--data"),
        (["--checkpoint", other_model_ckpt, "--data", shard, "--tau", "0.1", "--batches", "0"] + out, "--batches"),
    ]
    for argv, needle in cases:
        line = run_cli("prune", argv, capsys, monkeypatch)
        assert needle in line, (argv, line)


def test_subprocess_error_has_no_traceback_and_debug_shows_it(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    env.pop("MOLM_DS_DEBUG", None)
    cmd = [sys.executable, "launch/pretrain.py", "--config", str(TINY_JOB), "--set", "parallel.ep_size=2"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not divide the world size 1" in errors[0], p.stderr[-3000:]
    p = subprocess.run(cmd, cwd=REPO, env={**env, "MOLM_DS_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr
