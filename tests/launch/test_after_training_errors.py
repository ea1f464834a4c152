"""The after-training commands (launch/evaluate.py, generate.py, export.py, molm-prepare-data) follow the
user-error convention: a mistake ends in one `error:` line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import importlib.util

import pytest

from tests.train.helpers import REPO


def _main(script: str):
    spec = importlib.util.spec_from_file_location(f"launch_{script}", REPO / "launch" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def one_error_line(main, argv, capsys, monkeypatch) -> str:
    from molm_ds import cli

    monkeypatch.delenv("MOLM_DS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A weights-only checkpoint of the tiny model, trained on synthetic shards (no tokenizer named)."""
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds import checkpoint as ckpt
    from tests.train.helpers import write_shard

    d = tmp_path_factory.mktemp("ckpt")
    shard = write_shard(d / "data")
    ckpt.write_model(MoLM(ModelConfig.from_preset("tiny")), {"data": {"sources": [{"path": shard}], "seq_len": 32}},
                     str(d / "checkpoints"), tag="step_00000001", kind="test")
    return d


@pytest.mark.parametrize("argv,match", [
    (["--checkpoint", "CKPT", "--data", "DATA", "--stride", "64", "--seq-len", "32"], "--stride 64 is larger"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--context", "stream", "--score-eos"], "--score-eos is for"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--checkpoint", "CKPT", "--data", "nowhere/shards"], "nowhere/shards"),
    (["--checkpoint", "CKPT", "--data", "jsonl:missing.jsonl"], "no such file missing.jsonl"),
    (["--checkpoint", "missing_ckpt", "--data", "DATA"], "missing_ckpt does not exist"),
    (["--checkpoint", "CKPT", "--data", "DATA"], "pass --tokenizer"),
])
def test_evaluate_errors(argv, match, ckpt_dir, capsys, monkeypatch):
    argv = [a.replace("CKPT", str(ckpt_dir / "checkpoints")).replace("DATA", str(ckpt_dir / "data")) for a in argv]
    assert match in one_error_line(_main("evaluate"), argv, capsys, monkeypatch)


@pytest.mark.parametrize("argv,match", [
    (["--checkpoint", "CKPT"], "give --prompt"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--temperature", "0"], "must be > 0"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-p", "1.5"], "must be in (0, 1]"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--checkpoint", "CKPT", "--prompts-file", "missing.txt"], "missing.txt"),
    (["--checkpoint", "CKPT", "--prompt", "x"], "pass --tokenizer"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--tokenizer", "nope.model"], "nope.model: no such file"),
])
def test_generate_errors(argv, match, ckpt_dir, capsys, monkeypatch):
    argv = [a.replace("CKPT", str(ckpt_dir / "checkpoints")) for a in argv]
    assert match in one_error_line(_main("generate"), argv, capsys, monkeypatch)


def test_export_errors(ckpt_dir, tmp_path, capsys, monkeypatch):
    main = _main("export")
    ck = str(ckpt_dir / "checkpoints")
    assert "give --out DIR" in one_error_line(main, ["--checkpoint", ck], capsys, monkeypatch)
    assert "*.safetensors" in one_error_line(main, ["--checkpoint", ck, "--consolidated", "x.bin"], capsys, monkeypatch)
    assert "one of the arguments" in one_error_line(main, ["--out", "x"], capsys, monkeypatch)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert "not empty" in one_error_line(main, ["--checkpoint", ck, "--out", str(tmp_path / "full")], capsys, monkeypatch)
    assert "pass --tokenizer" in one_error_line(main, ["--checkpoint", ck, "--out", str(tmp_path / "hf")], capsys, monkeypatch)
    assert "no config.json" in one_error_line(main, ["--from-hf", str(tmp_path), "--out", str(tmp_path / "c")],
                                              capsys, monkeypatch)
    assert "--consolidated needs --checkpoint" in one_error_line(
        main, ["--from-hf", str(tmp_path), "--consolidated", "x.safetensors"], capsys, monkeypatch)


def test_prepare_data_errors(capsys, monkeypatch):
    from data_prep.commands import main

    assert "unknown command 'shard'" in one_error_line(main, ["shard", "--out", "x"], capsys, monkeypatch)
    assert "give a command" in one_error_line(main, [], capsys, monkeypatch)
