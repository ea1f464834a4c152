"""ds config: batch keys and clipping filled from the job or checked, world-size checks, ZeRO-3 refused."""

import pytest

from molm_ds.errors import ConfigError
from molm_ds.train import load_job
from molm_ds.train.ds_config import build_ds_config, read_ds_config
from molm_ds.testing import TINY_JOB, write_ds_config


def test_batch_keys_are_filled_from_the_job(tmp_path):
    job = load_job(TINY_JOB, ["training.micro_batch_size=3", "training.grad_accum_steps=5", "training.grad_clip=0.5",
                              f"run_dir={tmp_path}", "name=abc"])
    ds = build_ds_config(job, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "tensorboard"), "job_name": "abc"}


def test_agreeing_keys_pass_and_disagreeing_keys_say_what_to_change(tmp_path):
    ok = write_ds_config(tmp_path / "ok.json", train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
                         train_batch_size=8, zero_optimization={"stage": 1})
    job = load_job(TINY_JOB, [f"deepspeed.config={ok}"])
    assert build_ds_config(job, world_size=2)["train_batch_size"] == 8
    with pytest.raises(ValueError, match=r"train_batch_size=8 disagrees with the job .* gives 4\)"):
        build_ds_config(job, world_size=1)
    bad = write_ds_config(tmp_path / "bad.json", train_micro_batch_size_per_gpu=3)
    job = load_job(TINY_JOB, [f"deepspeed.config={bad}"])
    with pytest.raises(ValueError, match="training.micro_batch_size gives 2.*set it to 2"):
        build_ds_config(job, world_size=1)
    auto = write_ds_config(tmp_path / "auto.json", train_batch_size="auto", gradient_clipping="auto")
    ds = build_ds_config(load_job(TINY_JOB, [f"deepspeed.config={auto}"]), world_size=2)
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 1.0


def test_ep_size_must_divide_world_size():
    job = load_job(TINY_JOB, ["parallel.ep_size=2"])
    build_ds_config(job, world_size=4)
    with pytest.raises(ValueError, match="ep_size=2 does not divide the world size 3"):
        build_ds_config(job, world_size=3)


def test_read_refuses_stage3_fp16_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="stages 0, 1, 2"):
        read_ds_config(write_ds_config(tmp_path / "a.json", zero_optimization={"stage": 3}))
    with pytest.raises(ValueError, match="fp16 is not supported"):
        read_ds_config(write_ds_config(tmp_path / "b.json", fp16={"enabled": True}))
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_ds_config(tmp_path / "c.json")


@pytest.mark.parametrize("block, needle", [
    ({"fp16": True}, r"fp16=true must be an object"),
    ({"zero_optimization": "1"}, r"zero_optimization=\"1\" must be an object"),
    ({"zero_optimization": {"stage": "1"}}, r"zero_optimization.stage=\"1\" must be one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": True}}, r"zero_optimization.stage=true must be one of"),
    ({"bf16": {"enabled": "yes"}}, r"bf16.enabled=\"yes\" must be true or false"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": 1}}, r"zero_optimization.overlap_comm=1 must be true or false"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e8"}}, r"reduce_bucket_size=\"5e8\" must be an integer"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     r"offload_optimizer.device=\"gpu\" must be one of \"none\", \"cpu\", \"nvme\""),
    ({"gradient_clipping": "1.0"}, r"gradient_clipping=\"1.0\" must be a finite number"),
    ({"steps_per_print": True}, r"steps_per_print=true must be an integer"),
])
def test_values_of_the_wrong_type_name_the_key(tmp_path, block, needle):
    with pytest.raises(ConfigError, match=needle):
        read_ds_config(write_ds_config(tmp_path / "x.json", **block))


def test_deepspeed_idioms_still_pass(tmp_path):
    ds = read_ds_config(write_ds_config(tmp_path / "x.json", train_batch_size="auto",
                                        zero_optimization={"stage": 2, "reduce_bucket_size": 5e8}))
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8


def test_nvme_offload_is_refused_before_the_model_where_it_cannot_run(tmp_path, monkeypatch):
    from deepspeed.ops import op_builder

    from molm_ds.train.ds_config import check_machine

    p = write_ds_config(tmp_path / "n.json", zero_optimization={"stage": 2, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path)}})
    ds = read_ds_config(p)
    monkeypatch.setattr(op_builder.AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError, match="needs DeepSpeed's async_io op"):
        check_machine(ds, p)
    monkeypatch.setattr(op_builder.AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    check_machine(ds, p)  # the library is there and the path is a writable directory
    ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="nvme_path=.* must be an existing, writable directory"):
        check_machine(ds, p)


def test_a_ds_config_that_is_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "l.json"
    p.write_bytes(b'{"x": "caf\xe9"}')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_ds_config(p)


@pytest.mark.parametrize("path, ok", [("csv", True), ("../../escape", False), ("/etc/x", False)])
def test_ds_config_outputs_stay_inside_run_dir(tmp_path, path, ok):
    import os

    cfg = write_ds_config(tmp_path / "m.json", csv_monitor={"enabled": True, "output_path": path, "job_name": "j"})
    job = load_job(TINY_JOB, [f"deepspeed.config={cfg}", f"run_dir={tmp_path / 'run'}"])
    if ok:
        out = build_ds_config(job, world_size=1)["csv_monitor"]["output_path"]
        assert out == os.path.realpath(tmp_path / "run" / path)
    else:
        with pytest.raises(ConfigError, match="writes outside run_dir"):
            build_ds_config(job, world_size=1)
