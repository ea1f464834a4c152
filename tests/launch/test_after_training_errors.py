"""The after-training commands (launch/evaluate.py, generate.py, export.py, molm-prepare-data) follow the
user-error convention: a mistake ends in one `error:` line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import importlib.util

import pytest

from molm_ds.testing import REPO


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
    from molm_ds.testing import write_shard

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
    (["--checkpoint", "CKPT", "--data", "DATA", "--out", "TMP"], "is a directory: name a file"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--out", "EXISTING"], "exists: pass --overwrite"),
    (["--checkpoint", "CKPT", "--data", "DATA", "--device", "banana"], "'banana' is not a device"),
])
def test_evaluate_errors(argv, match, ckpt_dir, capsys, monkeypatch):
    existing = ckpt_dir / "existing.json"
    existing.write_text("{}")
    argv = [a.replace("CKPT", str(ckpt_dir / "checkpoints")).replace("DATA", str(ckpt_dir / "data"))
            .replace("TMP", str(ckpt_dir)).replace("EXISTING", str(existing)) for a in argv]
    assert match in one_error_line(_main("evaluate"), argv, capsys, monkeypatch)


@pytest.mark.parametrize("argv,match", [
    (["--checkpoint", "CKPT"], "give --prompt"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--temperature", "0"], "must be > 0"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-p", "1.5"], "must be in (0, 1]"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--checkpoint", "CKPT", "--prompts-file", "missing.txt"], "missing.txt"),
    (["--checkpoint", "CKPT", "--prompt", "x"], "pass --tokenizer"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--tokenizer", "nope.model"], "nope.model: no such file"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--temperature", "inf"], "must be > 0 and finite"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--temperature", "nan"], "must be > 0 and finite"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-p", "nan"], "must be in (0, 1]"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--top-k", "100000"], "more than the model's 512 tokens"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--seed", "-1"], "--seed -1 must be in"),
    (["--checkpoint", "CKPT", "--prompt", ""], "--prompt #1 is empty"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--prompt", "  "], "--prompt #2 is empty"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--device", "banana"], "'banana' is not a device"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--device", "cuda"], "CUDA is not available"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--out", "TMP"], "is a directory: name a file"),
    (["--checkpoint", "CKPT", "--prompt", "x", "--out", "EXISTING"], "exists: pass --overwrite"),
    (["--checkpoint", "CKPT", "--prompts-file", "LATIN1"], "is not UTF-8 text (byte 6, line 2)"),
    (["--checkpoint", "CKPT", "--prompts-file", "EMPTYJSON"], ":1: the 'prompt' field must be a non-empty string"),
])
def test_generate_errors(argv, match, ckpt_dir, capsys, monkeypatch):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (ckpt_dir / "existing.json").write_text("{}")
    (ckpt_dir / "latin1.txt").write_bytes(b"ok\ncaf\xe9\n")
    (ckpt_dir / "empty.jsonl").write_text('{"prompt": ""}\n')
    argv = [a.replace("CKPT", str(ckpt_dir / "checkpoints")).replace("TMP", str(ckpt_dir))
            .replace("EXISTING", str(ckpt_dir / "existing.json")).replace("LATIN1", str(ckpt_dir / "latin1.txt"))
            .replace("EMPTYJSON", str(ckpt_dir / "empty.jsonl")) for a in argv]
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
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a directory" in one_error_line(
        main, ["--checkpoint", ck, "--out", str(tmp_path / "a_file")], capsys, monkeypatch)
    (tmp_path / "m.safetensors").write_text("x")
    assert "exists: pass --overwrite" in one_error_line(
        main, ["--checkpoint", ck, "--consolidated", str(tmp_path / "m.safetensors")], capsys, monkeypatch)
    assert (tmp_path / "m.safetensors").read_text() == "x"  # not replaced
    for size in ("0", "-5MB"):
        assert "must be more than 0 bytes" in one_error_line(
            main, ["--checkpoint", ck, "--out", str(tmp_path / "o"), f"--max-shard-size={size}"], capsys, monkeypatch)


def test_generation_past_the_trained_context_is_a_warning_that_says_why():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", REPO / "launch" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.check_context(10, 54, 64) is None and gen.check_context(10, 3000, None) is None
    w = gen.check_context(10, 3000, 64)
    assert w.startswith("warning:") and "past the 64 tokens the model was trained on" in w
    assert "no position embedding" in w and "--max-new-tokens 54" in w


def test_prepare_data_errors(capsys, monkeypatch):
    from data_prep.commands import main

    assert "unknown command 'shard'" in one_error_line(main, ["shard", "--out", "x"], capsys, monkeypatch)
    assert "give a command" in one_error_line(main, [], capsys, monkeypatch)
