"""Every shipped ds_config and job YAML loads and agrees with the code (litgpt's config-hub test)."""

from pathlib import Path

import pytest
import yaml

from molm_ds.train import load_job
from molm_ds.train.ds_config import SUPPORTED_ZERO_STAGES, build_ds_config, offloads_optimizer, read_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
JOBS = sorted((REPO / "configs").glob("*.yaml"))
DOC = (REPO / "docs" / "training.md").read_text()


def test_something_is_shipped():
    assert len(DS_CONFIGS) >= 8 and any(p.name == "demo.yaml" for p in JOBS)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_loads_and_is_documented(path):
    ds = read_ds_config(path)
    stem = path.stem  # zero{stage}[_offload]_{fp32|bf16}
    assert zero_stage(ds) in SUPPORTED_ZERO_STAGES and stem.startswith(f"zero{zero_stage(ds)}")
    assert offloads_optimizer(ds) == ("offload" in stem)
    assert bool(ds.get("bf16", {}).get("enabled")) == stem.endswith("bf16")
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & set(ds), \
        "shipped ds configs leave the batch keys to the job"
    assert f"`ds_configs/{path.name}`" in DOC, "each ds config has its one-line description in docs/training.md"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_loads_and_builds_its_ds_config(path):
    job = load_job(path)
    world = max(2, job.parallel.ep_size)
    ds = build_ds_config(job, world_size=world)
    t = job.training
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum_steps * world
    assert job.build_model_config().vocab_size >= 2
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(type(job).model_fields)


def test_demo_job_is_what_make_demo_promises():
    job = load_job(REPO / "configs" / "demo.yaml")
    assert job.parallel.ep_size == 2 and job.model.preset == "tiny"
    assert all(s.path.startswith("data/embedded/shards/") for s in job.data.sources)
    assert "configs/demo.yaml" in (REPO / "scripts" / "demo.sh").read_text()
