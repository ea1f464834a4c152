"""Job config: strict validation, overrides, cross-field errors that say what to change."""

import re

import pytest
import yaml

from molm_ds.train import JobConfigError, load_job
from molm_ds.train.job import apply_overrides, parse_overrides
from molm_ds.testing import TINY_JOB, write_ds_config, write_yaml


def test_tiny_job_loads_and_builds_model_config():
    job = load_job(TINY_JOB)
    cfg = job.build_model_config()
    assert cfg.n_mlp_experts == 4 and job.data.seq_len == 32
    assert job.training.loss_weights.mi > 0  # MI on by default
    assert job.checkpoint_dir.endswith("checkpoints") and job.tensorboard_dir.endswith("tensorboard")


def test_overrides_are_parsed_as_yaml_and_applied():
    assert parse_overrides(["training.steps=10", "model.overrides={d_model: 32}"]) == [
        (["training", "steps"], 10), (["model", "overrides"], {"d_model": 32})]
    raw = apply_overrides({"training": {"steps": 3}}, ["training.lr=1e-3", "checkpoint.interval=5"])
    assert raw == {"training": {"steps": 3, "lr": 1e-3}, "checkpoint": {"interval": 5}}
    job = load_job(TINY_JOB, ["training.steps=9", "parallel.ep_size=2"])
    assert job.training.steps == 9 and job.parallel.ep_size == 2
    with pytest.raises(JobConfigError, match="section.key=value"):
        parse_overrides(["training.steps"])


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(JobConfigError) as e:
        load_job(TINY_JOB, ["training.stepz=3"])
    assert "--set training.stepz=3: unknown key; did you mean 'steps'?" in str(e.value)
    assert "steps, micro_batch_size" in str(e.value)
    with pytest.raises(JobConfigError, match="valid keys here: .*model.*data.*training"):
        load_job(TINY_JOB, ["trainig.steps=3"])
    with pytest.raises(JobConfigError, match=r"unknown keys \['foo'\]; valid keys: vocab_size"):
        load_job(TINY_JOB, ["model.overrides={foo: 1}"])


def test_a_bad_set_value_names_the_set_not_the_job_file(tmp_path):
    with pytest.raises(JobConfigError) as e:
        load_job(TINY_JOB, ["training.steps=twenty"])
    assert str(e.value).startswith("invalid override: --set training.steps=twenty: ") and "tiny_test" not in str(e.value)
    bad = write_yaml(tmp_path / "bad.yaml", {**yaml.safe_load(TINY_JOB.read_text()), "name": [1]})
    with pytest.raises(JobConfigError) as e:
        load_job(bad, ["training.steps=0"])
    assert f"invalid job config {bad}: " in str(e.value) and "name: " in str(e.value)
    assert "--set training.steps=0: Input should be greater than or equal to 1" in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.ep_size=3"], "ep_size=3 does not divide model n_mlp_experts=4"),
    (["model.overrides={n_att_experts: 6}", "parallel.ep_size=4"], "n_att_experts=6.*replicate_attention_experts"),
    (["training.warmup_steps=99"], "lower warmup_steps"),
    (["model.preset=huge"], "valid presets: tiny"),
    (["continual={new_experts: 2}"], "continual.new_experts: unknown key"),
    (["deepspeed.config=ds_configs/nope.json"], "shipped configs: .*zero1_fp32"),
])
def test_cross_field_errors_say_what_to_change(overrides, needle):
    with pytest.raises(JobConfigError, match=needle):
        load_job(TINY_JOB, overrides)


def test_replicated_attention_experts_lift_the_attention_constraint():
    job = load_job(TINY_JOB, ["model.overrides={n_att_experts: 6, k_att: 2}", "parallel.ep_size=4",
                              "parallel.replicate_attention_experts=true"])
    assert job.parallel.ep_size == 4


def test_zero3_and_job_owned_blocks_are_refused(tmp_path):
    z3 = write_ds_config(tmp_path / "z3.json", zero_optimization={"stage": 3})
    with pytest.raises(JobConfigError, match="stage=3 is not supported with MoE.*stages 0, 1, 2"):
        load_job(TINY_JOB, [f"deepspeed.config={z3}"])
    opt = write_ds_config(tmp_path / "opt.json", optimizer={"type": "Adam"})
    with pytest.raises(JobConfigError, match="remove the 'optimizer' block"):
        load_job(TINY_JOB, [f"deepspeed.config={opt}"])


def test_missing_job_file_and_non_mapping(tmp_path):
    with pytest.raises(JobConfigError, match="shipped jobs: .*tiny_test.yaml"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(JobConfigError, match="YAML mapping"):
        load_job(bad)


def test_job_round_trips_through_yaml(tmp_path):
    import yaml

    job = load_job(TINY_JOB, ["training.steps=11"])
    again = load_job(write_yaml(tmp_path / "j.yaml", yaml.safe_load(job.to_yaml())))
    assert again == job


@pytest.mark.parametrize("overrides, needle", [
    (["training.steps=true"], "--set training.steps=true: Input should be a valid integer"),
    (["training.steps='2'"], "--set training.steps='2': Input should be a valid integer"),
    (["training.steps=2.0"], "--set training.steps=2.0: Input should be a valid integer"),
    (["training.activation_checkpointing=1"], "valid boolean"),
    (["training.grad_clip=.inf"], "--set training.grad_clip=.inf: Input should be a finite number"),
    (["training.lr=.inf"], "--set training.lr=.inf: Input should be a finite number"),
    (["training.loss_weights.mi=.nan"], "--set training.loss_weights.mi=.nan: Input should be a finite number"),
    (["model.overrides={d_model: '64'}"], "valid integer"),
    (["training.seed=-5"], "--set training.seed=-5: Input should be greater than or equal to 0"),
    (["training.seed=100000000000000000000000"], "training.seed"),
    (["checkpoint.preempt_signals=[SIGCHLD]"], "SIGCHLD.*signals that ask a job to end"),
    (["checkpoint.preempt_signals=[SIGTERM, SIGTERM]"], "twice"),
    (["name=../../../x"], "plain name"),
    (["name=a/b"], "plain name"),
])
def test_values_are_strict_finite_and_in_range(overrides, needle):
    with pytest.raises(JobConfigError, match=re.escape(needle) if needle.startswith("--set") else needle):
        load_job(TINY_JOB, overrides)


def test_same_source_twice_is_refused(tmp_path):
    d = tmp_path / "shard"
    d.mkdir()
    with pytest.raises(JobConfigError, match=r"sources\[1\].*same data as sources\[0\]"):
        load_job(TINY_JOB, [f"data.sources=[{{path: '{d}'}}, {{path: '{d}/'}}]"])


def test_yaml_floats_without_a_dot_are_floats_and_betas_take_a_list(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text(TINY_JOB.read_text() + "\n")
    job = load_job(f, ["training.betas=[0.8, 0.9]"])
    assert job.training.betas == (0.8, 0.9)
    from molm_ds.train.job import parse_yaml

    assert parse_yaml("lr: 1e-3\nx: 2E5\ny: 1.0e3", "t") == {"lr": 1e-3, "x": 2e5, "y": 1e3}


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", b"\x00\x01\xff\xfe binary"])
def test_a_job_file_that_is_not_utf8_is_one_line(tmp_path, content):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(content)
    with pytest.raises(JobConfigError, match=f"job file {f} is not UTF-8 text.*save it as UTF-8"):
        load_job(f)
