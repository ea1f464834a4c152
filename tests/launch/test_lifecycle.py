"""README's life cycle on the embedded corpus, each command as the README writes it (checked against the
README text) plus a tiny budget: prepare -> train -> evaluate -> generate -> export -> lm-evaluation-harness.
Then what the exported files promise: lm-eval's rolling log-likelihood equals launch/evaluate.py's on
the same text (the README's task and one defined here, with documents longer than the window), the
consolidated fp32 file and `--from-hf` -> `init_from` give the model's own logits."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from molm_ds.testing import REPO

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text()
# (the README's command, what the test adds for a tiny budget)
STEPS = [
    ("python -m data_prep.embedded --out data/embedded", ""),
    ("python launch/pretrain.py --config configs/demo.yaml --set parallel.ep_size=1 --set training.steps=30 "
     "--set run_dir=runs/life",
     "--set training.steps=3 --set training.micro_batch_size=2 --set data.seq_len=32 --set training.warmup_steps=1 "
     "--set checkpoint.interval=0 --set training.eval_interval=0 --set monitor.tensorboard=false"),
    ("python launch/evaluate.py --checkpoint runs/life/checkpoints --data data/embedded/shards/code "
     "'jsonl:data/embedded/pile/train/00.jsonl.zst' --max-docs 16 --out runs/life/eval.json", "--max-docs 2"),
    ("python launch/generate.py --checkpoint runs/life/checkpoints --prompt 'def fibonacci(n):' --max-new-tokens 48",
     "--max-new-tokens 6"),
    ("python launch/export.py --checkpoint runs/life/checkpoints --out runs/life/hf "
     "--consolidated runs/life/model_fp32.safetensors", ""),
    ("lm_eval --model hf --model_args pretrained=runs/life/hf,trust_remote_code=True --include_path configs/lm_eval "
     "--tasks molm_embedded_code --limit 8 --device cpu", "--limit 2 --batch_size 4 --output_path runs/life/lm_eval"),
]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
             PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def sh(cmd: str, cwd) -> str:
    """Run a README command from ``cwd`` (a fresh directory); scripts and configs resolve from the checkout."""
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
        if argv[1].startswith("launch/"):
            argv[1] = str(REPO / argv[1])
    elif argv[0] == "lm_eval":
        argv[0] = str(BIN / "lm_eval")
        argv = [str(REPO / a) if a == "configs/lm_eval" else a for a in argv]
    p = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-6000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lifecycle")
    outs = {}
    for cmd, extra in STEPS:
        assert cmd in README.replace("\\\n", ""), f"README no longer says: {cmd}"
        outs[cmd.split()[1] if cmd.startswith("python") else cmd.split()[0]] = sh(f"{cmd} {extra}", cwd)
    return cwd, outs


def _lm_eval_results(directory: Path) -> dict:
    files = sorted(directory.rglob("results_*.json"))
    assert files, f"no lm-eval results under {directory}"
    return json.loads(files[-1].read_text())["results"]


def test_every_step_ran(lifecycle):
    cwd, outs = lifecycle
    assert (cwd / "data/embedded/tokenizer.model").is_file()
    assert (cwd / "runs/life/checkpoints/step_00000003/COMPLETE").is_file()
    ev = json.loads((cwd / "runs/life/eval.json").read_text())
    assert [r["documents"] for r in ev["sources"]] == [2, 2] and ev["all"]["bits_per_byte"] > 0
    assert "=== 'def fibonacci(n):'" in outs["launch/generate.py"]
    for f in ("config.json", "modeling_molm.py", "configuration_molm.py", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json", "tokenizer.model", "README.md"):
        assert (cwd / "runs/life/hf" / f).is_file(), f
    assert "molm_embedded_code" in outs["lm_eval"]
    # export says what it wrote, then who loads it as a note (not as an error); one file mode throughout
    out = outs["launch/export.py"]
    assert "wrote runs/life/hf: a Hugging Face directory" in out and "\nnote: loads in transformers" in out, out
    modes = {f.stat().st_mode & 0o777 for f in (cwd / "runs/life/hf").iterdir()}
    assert len(modes) == 1 and (cwd / "runs/life/model_fp32.safetensors").stat().st_mode & 0o777 in modes
    # lm-eval on the export: no task-file guesses, no "indexing errors" from the tokenizer
    assert "is defined, but" not in outs["lm_eval"] and "indexing errors" not in outs["lm_eval"], outs["lm_eval"]


def test_lm_eval_equals_evaluate_on_the_readme_task(lifecycle):
    cwd, _ = lifecycle
    theirs = _lm_eval_results(cwd / "runs/life/lm_eval")["molm_embedded_code"]
    sh("python launch/evaluate.py --checkpoint runs/life/hf --data jsonl:data/embedded/pile/train/00.jsonl.zst "
       "--max-docs 2 --out runs/life/eval_hf.json", cwd)
    ours = json.loads((cwd / "runs/life/eval_hf.json").read_text())["all"]
    assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)


LOCAL_TASK = """task: molm_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""


def test_lm_eval_rolling_loglikelihood_equals_evaluate(lifecycle, tmp_path):
    """A task defined here: unicode, code and whitespace, documents several windows long (max_length 16)."""
    cwd, _ = lifecycle
    docs = ["naïve café — “quotes” 日本語 🎉 and  double  spaces\tand tabs " * 3,
            "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
            "short"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "molm_local.yaml").write_text(LOCAL_TASK.format(data=data))
    hf = cwd / "runs/life/hf"
    sh(f"lm_eval --model hf --model_args pretrained={hf},trust_remote_code=True,max_length=16 --include_path "
       f"{tmp_path / 'tasks'} --tasks molm_local --device cpu --batch_size 2 --output_path {tmp_path / 'out'} --log_samples", cwd)
    theirs = _lm_eval_results(tmp_path / "out")["molm_local"]
    samples = [json.loads(line) for f in sorted((tmp_path / "out").rglob("samples_molm_local*.jsonl"))
               for line in f.read_text().splitlines()]
    total_ll = sum(float(s["filtered_resps"][0] if not isinstance(s["filtered_resps"][0], list)
                         else s["filtered_resps"][0][0]) for s in samples)
    for i, ckpt in enumerate((hf, cwd / "runs/life/checkpoints")):  # evaluate replaces no --out file
        out = tmp_path / f"ours{i}.json"
        sh(f"python launch/evaluate.py --checkpoint {ckpt} --data jsonl:{data} --seq-len 16 --out {out}", cwd)
        ours = json.loads(out.read_text())["all"]
        assert ours["tokens"] > 3 * 16  # several windows
        assert -ours["loss"] * ours["tokens"] == pytest.approx(total_ll, rel=1e-5)
        assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)


def test_consolidated_file_and_from_hf_give_the_same_logits(lifecycle):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds import checkpoint as ckpt
    from molm_ds.train.job import job_from_dict
    from molm_ds.train.recipe import Recipe

    cwd, _ = lifecycle
    original = ckpt.load_fp32_model(str(cwd / "runs/life/checkpoints")).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(ids).logits

    path = str(cwd / "runs/life/model_fp32.safetensors")
    with safe_open(path, "pt") as f:
        cfg = ModelConfig(**json.loads(f.metadata()["molm_ds_config"]))
    flat = MoLM(cfg)
    flat.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        assert torch.equal(flat.eval()(ids).logits, want)
        hf = AutoModelForCausalLM.from_pretrained(str(cwd / "runs/life/hf"), trust_remote_code=True).eval()
        got = hf(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5

    sh("python launch/export.py --from-hf runs/life/hf --out runs/imported", cwd)
    d, tag = ckpt.resolve(str(cwd / "runs/imported"))
    section = ckpt.read_job(d, tag)["model"]
    job = job_from_dict({"model": section, "init_from": str(cwd / "runs/imported"),
                         "data": {"sources": [{"path": str(cwd / "data/embedded/shards/code")}], "seq_len": 32},
                         "training": {"steps": 1, "micro_batch_size": 1}})
    recipe = Recipe(job)
    recipe.check()  # what the trainer's preflight runs for init_from
    with torch.no_grad():
        assert torch.equal(recipe.build_model().eval()(ids).logits, want)
