"""The README works top to bottom, as printed, in a fresh clone: every command of its "Training" and "After
training" sections (with "Several processes and machines") runs in order and does what the README says.
Each training command has its own run directory (after `make demo`, runs/demo holds the demo's) and `--resume
auto` continues the run before it with a raised `training.steps`. Then what the exported files promise:
lm-eval's rolling log-likelihood equals launch/evaluate.py's on the same text (the README's task and one
defined here, with documents longer than the window), the consolidated fp32 file and `--from-hf` ->
`init_from` give the model's own logits.

Only what this machine needs is added to a command: a free port for `deepspeed` and, as root, mpirun's
`--allow-run-as-root --oversubscribe` (the README names both). `source .venv/bin/activate` is the test's
PATH. The `pip install` line is checked, not run: its extra must be installed in this venv (`make venv`
installs it); running it would point the venv's editable install at the temporary clone. The two commands
at the top are `make test` (this suite) and `make demo` (150 steps on 2 ranks; the same job at 20 steps is
the second Training command)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from molm_ds import rundir
from molm_ds.checkpoint import is_complete, tag_for
from molm_ds.testing import BIN, REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SECTIONS = ("Training", "After training")  # "### Several processes and machines" is inside the second


def section_commands(title: str) -> list[str]:
    """Command lines (not comments, not `source`) of the bash blocks under README heading `## title`."""
    text = (REPO / "README.md").read_text()
    body = re.split(r"^## ", text, flags=re.M)
    section = next(b for b in body if b.startswith(title))
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith(("#", "source "))]
    return lines


def readme_commands() -> list[str]:
    return [c for title in SECTIONS for c in section_commands(title)]


def _env(root: Path) -> dict:
    e = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(root),
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DS_ACCELERATOR"):
        e.pop(k, None)  # the README's own `export` lines set what its commands need
    return e


def _set(argv: list[str], key: str) -> str | None:
    vals = [argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv[:-1]) if a == "--set" and argv[i + 1].startswith(key + "=")]
    return vals[-1] if vals else None


def _is_pretrain(argv: list[str]) -> bool:
    return any(a.endswith("launch/pretrain.py") for a in argv)


def test_readme_runs_do_not_collide_with_the_demo_or_each_other():
    """After `make demo`, runs/demo holds the demo's finished run: every training command of the README names
    its own run_dir, and a --resume continues the command before it with more steps (the total)."""
    cmds = [a for a in (shlex.split(c, comments=True) for c in readme_commands()) if _is_pretrain(a)]
    assert len(cmds) >= 6
    seen, prev = set(), None
    for argv in cmds:
        run_dir, steps = _set(argv, "run_dir"), _set(argv, "training.steps")
        assert run_dir and run_dir != "runs/demo" and steps, " ".join(argv)
        if "--resume" in argv:
            assert prev and run_dir == prev[0] and int(steps) > int(prev[1]), " ".join(argv)
        else:
            assert run_dir not in seen, " ".join(argv)
        seen.add(run_dir)
        prev = (run_dir, steps)


def fresh_clone(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked and new, not ignored: no runs/, data/, .venv)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def _check_pip_line(argv: list[str]) -> None:
    """`pip install -e '.[extra]'`: the extra exists and every package it names is installed here."""
    extras = [e for a in argv for e in re.findall(r"\[([\w,-]+)\]", a)]
    assert extras, argv
    for extra in ",".join(extras).split(","):
        reqs = [r for r in metadata.requires("molm-ds") or [] if f'extra == "{extra}"' in r]
        assert reqs, f"pyproject.toml has no extra {extra!r}"
        for r in reqs:
            metadata.distribution(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0])


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Run every command of the README sections in order in one fresh clone: (clone, [(argv, output)] per
    command, {command index: its run's loss rows right after it} for the training commands)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to clone from")
    clone = fresh_clone(tmp_path_factory.mktemp("readme") / "clone")
    # what a user's first commands leave behind, which PYTHONDONTWRITEBYTECODE (set on the build machine)
    # would have every command compile again
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "molm_ds", "launch", "data_prep"], cwd=clone,
                   check=True, capture_output=True, timeout=300)
    env = _env(clone)
    # "`make demo` has already built the embedded corpus; otherwise <this command> does"
    subprocess.run([sys.executable, "-m", "data_prep.embedded", "--out", "data/embedded"], cwd=clone, env=env,
                   check=True, capture_output=True, timeout=300)
    done = []
    for cmd in readme_commands():
        argv = shlex.split(cmd, comments=True)
        if argv[0] == "export":  # export VAR=value: for the commands after it
            env.update(a.split("=", 1) for a in argv[1:])
            continue
        if argv[:2] == ["pip", "install"]:
            _check_pip_line(argv)
            continue
        run_env = dict(env)
        while "=" in argv[0]:  # leading VAR=value assignments
            k, v = argv.pop(0).split("=", 1)
            run_env[k] = v
        if argv[0] == "mpirun" and os.geteuid() == 0 and "--allow-run-as-root" not in argv:
            argv[1:1] = ["--allow-run-as-root", "--oversubscribe"]
        if argv[0] == "deepspeed":
            argv[1:1] = ["--master_port", str(free_port())]
        shell = any(op in argv for op in (">", ">>", "|"))
        p = subprocess.run(shlex.join(argv).replace("'>'", ">") if shell else argv, shell=shell, cwd=clone,
                           env=run_env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-4000:]}"
        done.append((argv, p.stdout + p.stderr, _train_rows(clone, argv)))
    return clone, [d[:2] for d in done], {i: d[2] for i, d in enumerate(done) if d[2] is not None}


def _train_rows(clone: Path, argv: list[str]) -> dict | None:
    """A training command's run as it stood right after the command: {step: row} of its loss rows."""
    if not _is_pretrain(argv):
        return None
    rows = [json.loads(line) for line in (clone / _set(argv, "run_dir") / rundir.METRICS).read_text().splitlines()
            if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def _output(readme, program: str) -> str:
    outs = [out for argv, out in readme[1] if program in argv[:2]]
    assert len(outs) == 1, program
    return outs[0]


def test_every_training_command_trained_what_it_says(readme):
    """Each run reached its training.steps with a finite loss in its own run_dir; a --resume run kept the
    earlier rows and went on from them."""
    _, done, trained = readme
    assert len(trained) >= 6
    prev_steps = 0
    for i, train in sorted(trained.items()):
        argv, out = done[i]
        steps = int(_set(argv, "training.steps"))
        assert max(train) == steps and train[steps]["loss"] > 0, (argv, sorted(train))
        if "--resume" in argv:
            assert "resumed from" in out and prev_steps in train and prev_steps < steps, argv
        prev_steps = steps


def test_life_cycle_wrote_what_the_readme_says(readme):
    clone = readme[0]
    life = clone / "runs/life"
    assert (clone / "data/embedded/tokenizer.model").is_file()
    assert is_complete(rundir.checkpoint_dir(life), tag_for(30))
    ev = json.loads((life / "eval.json").read_text())
    assert len(ev["sources"]) == 2 and all(r["documents"] > 0 for r in ev["sources"]) and ev["all"]["bits_per_byte"] > 0
    assert "=== 'def fibonacci(n):'" in _output(readme, "launch/generate.py")
    for f in ("config.json", "modeling_molm.py", "configuration_molm.py", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json", "tokenizer.model", "README.md"):
        assert (life / "hf" / f).is_file(), f
    lm_eval = _output(readme, "lm_eval")
    assert "molm_embedded_code" in lm_eval
    # export says what it wrote, then who loads it as a note (not as an error); one file mode throughout
    out = _output(readme, "launch/export.py")
    assert "wrote runs/life/hf: a Hugging Face directory" in out and "\nnote: loads in transformers" in out, out
    modes = {f.stat().st_mode & 0o777 for f in (life / "hf").iterdir()}
    assert len(modes) == 1 and (life / "model_fp32.safetensors").stat().st_mode & 0o777 in modes
    # lm-eval on the export: no task-file guesses, no "indexing errors" from the tokenizer
    assert "is defined, but" not in lm_eval and "indexing errors" not in lm_eval, lm_eval


def sh(cmd: str, cwd: Path) -> str:
    env = dict(_env(cwd), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run(shlex.split(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-6000:]}"
    return p.stdout + p.stderr


def _lm_eval_results(directory: Path) -> dict:
    files = sorted(directory.rglob("results_*.json"))
    assert files, f"no lm-eval results under {directory}"
    return json.loads(files[-1].read_text())["results"]


def test_lm_eval_equals_evaluate_on_the_readme_task(readme):
    """The README's lm-eval command scored its first --limit documents; launch/evaluate.py on the export and the
    same documents gives the same bits per byte."""
    clone, done, _ = readme
    argv = next(a for a, _ in done if a[0] == "lm_eval")
    limit = argv[argv.index("--limit") + 1]
    theirs = _lm_eval_results(clone / argv[argv.index("--output_path") + 1])["molm_embedded_code"]
    sh(f"python launch/evaluate.py --checkpoint runs/life/hf --data jsonl:data/embedded/pile/train/00.jsonl.zst "
       f"--max-docs {limit} --out runs/life/eval_hf.json", clone)
    ours = json.loads((clone / "runs/life/eval_hf.json").read_text())["all"]
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


def test_lm_eval_rolling_loglikelihood_equals_evaluate(readme, tmp_path):
    """A task defined here: unicode, code and whitespace, documents several windows long (max_length 16)."""
    clone = readme[0]
    docs = ["naïve café — “quotes” 日本語 🎉 and  double  spaces\tand tabs " * 3,
            "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
            "short"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "molm_local.yaml").write_text(LOCAL_TASK.format(data=data))
    hf = clone / "runs/life/hf"
    sh(f"lm_eval --model hf --model_args pretrained={hf},trust_remote_code=True,max_length=16 --include_path "
       f"{tmp_path / 'tasks'} --tasks molm_local --device cpu --batch_size 2 --output_path {tmp_path / 'out'} --log_samples",
       clone)
    theirs = _lm_eval_results(tmp_path / "out")["molm_local"]
    samples = [json.loads(line) for f in sorted((tmp_path / "out").rglob("samples_molm_local*.jsonl"))
               for line in f.read_text().splitlines()]
    total_ll = sum(float(s["filtered_resps"][0] if not isinstance(s["filtered_resps"][0], list)
                         else s["filtered_resps"][0][0]) for s in samples)
    for i, ckpt in enumerate((hf, clone / "runs/life/checkpoints")):  # evaluate replaces no --out file
        out = tmp_path / f"ours{i}.json"
        sh(f"python launch/evaluate.py --checkpoint {ckpt} --data jsonl:{data} --seq-len 16 --out {out}", clone)
        ours = json.loads(out.read_text())["all"]
        assert ours["tokens"] > 3 * 16  # several windows
        assert -ours["loss"] * ours["tokens"] == pytest.approx(total_ll, rel=1e-5)
        assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)


def test_consolidated_file_and_from_hf_give_the_same_logits(readme):
    pytest.importorskip("transformers")
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from molm_ds import checkpoint as ckpt
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.train.job import job_from_dict
    from molm_ds.train.recipe import Recipe

    clone = readme[0]
    original = ckpt.load_fp32_model(str(clone / "runs/life/checkpoints")).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(ids).logits

    path = str(clone / "runs/life/model_fp32.safetensors")
    with safe_open(path, "pt") as f:
        cfg = ModelConfig(**json.loads(f.metadata()["molm_ds_config"]))
    flat = MoLM(cfg)
    flat.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        assert torch.equal(flat.eval()(ids).logits, want)
        hf = AutoModelForCausalLM.from_pretrained(str(clone / "runs/life/hf"), trust_remote_code=True).eval()
        got = hf(ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5

    sh("python launch/export.py --from-hf runs/life/hf --out runs/imported", clone)
    d, tag = ckpt.resolve(str(clone / "runs/imported"))
    section = ckpt.read_job(d, tag)["model"]
    job = job_from_dict({"model": section, "init_from": str(clone / "runs/imported"),
                         "data": {"sources": [{"path": str(clone / "data/embedded/shards/code")}], "seq_len": 32},
                         "training": {"steps": 1, "micro_batch_size": 1}})
    recipe = Recipe(job)
    recipe.check()  # what the trainer's preflight runs for init_from
    with torch.no_grad():
        assert torch.equal(recipe.build_model().eval()(ids).logits, want)
