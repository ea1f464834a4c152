"""Each benchmark script runs end to end on tiny shapes and ends with its JSON line of ratios (no timing
is asserted: speed is read from the printed figures, not tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "moe_layer": (["--tokens", "64", "--d-model", "16", "--hidden", "32", "--experts", "4", "--iters", "1",
                   "--warmup", "0"], {"ours_over_dense", "deepspeed_over_ours"}),
    "stickbreaking": (["--batch", "1", "--heads", "2", "--seq", "64", "--head-dim", "8", "--iters", "1",
                       "--warmup", "0"], {"ours_over_sdpa", "ours_over_sdpa_long_stick", "naive_over_ours", "naive_peak_over_ours_peak"}),
    "train_step": (["--preset", "tiny", "--batch", "1", "--seq", "8", "--backend", "aot_eager", "--iters", "1",
                    "--warmup", "0"], {"compiled_over_eager", "compile_seconds"}),
    "deterministic": (["--preset", "tiny", "--batch", "1", "--seq", "8", "--iters", "1", "--warmup", "0"],
                      {"deterministic_over_default"}),
    "data_prep": (["--mb", "0.2", "--files", "2", "--workers", "2", "--vocab-size", "1000"],
                  {"e2e_mb_per_s", "tokens_per_s", "raw_encode_mb_per_s_1thread", "fraction_of_limit",
                   "ranks_scaling", "tokens_per_s_1rank"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_prints_ratios(name, tmp_path):
    args, keys = CASES[name]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MOLM_DS_KERNELS="torch")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys <= set(last), last
    assert all(v > 0 for k, v in last.items() if k in keys), last
