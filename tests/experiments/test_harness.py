"""The science harness (experiments/): a shrunken grid through the real trainer, skip-done, user errors,
and the pure parts (aggregation, settings checks). The grid test runs 2 trainer runs of 3 steps (~20-40 s)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from experiments.science import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_prep.embedded import build_embedded

    out = str(tmp_path_factory.mktemp("corpus") / "embedded")  # shards/prose and shards/code, like data/science
    build_embedded(out, vocab_size=512, code_bytes=200_000, say=lambda _: None)
    return out


def test_s2_grid_table_comes_from_the_runs(corpus, tmp_path, capsys):
    from experiments import s2_dense

    out = str(tmp_path / "s2")
    args = ["--out", out, "--data", corpus, "--seeds", "1", "--lrs", "1e-2", "--steps", "3", "--windows", "16"]
    assert s2_dense.main(args) == 0
    md = open(os.path.join(out, "results.md")).read()
    loss = {}
    for m in ("moe", "dense"):
        res = json.load(open(os.path.join(out, "runs", f"{m}_lr0.01_s1", "measure.json")))
        loss[m] = sum(d["loss"] for d in res["domains"].values()) / 2
        assert res["domains"]["prose"]["tokens"] == 16 * 64
        assert f"| {m} | 0.01 | 1 | {loss[m]:.3f} ± 0.000 |" in md
    assert loss["moe"] != loss["dense"]
    assert os.path.isfile(os.path.join(out, "s2.png"))
    # params come from the trainer's own count: equal active, twice the expert weights for the MoE
    agg = json.load(open(os.path.join(out, "results.json")))["aggregate"]
    assert agg["moe"]["per_lr"]["0.01"]["params"][0] > agg["dense"]["per_lr"]["0.01"]["params"][0]

    # A rerun trains nothing and rebuilds the table from the files: change one and it shows.
    capsys.readouterr()
    path = os.path.join(out, "runs", "dense_lr0.01_s1", "measure.json")
    res = json.load(open(path))
    for d in res["domains"].values():
        d["loss"] = 9.25
    json.dump(res, open(path, "w"))
    assert s2_dense.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 2
    assert "| dense | 0.01 | 1 | 9.250 ± 0.000 |" in open(os.path.join(out, "results.md")).read()


def _cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)


def test_out_with_other_content_is_one_error_line(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = _cli("-m", "experiments.s1_balance", "--out", str(tmp_path), "--data", corpus)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --out") and r.stderr.count("\n") == 1, r.stderr


def test_other_settings_in_the_same_out_are_refused(corpus, tmp_path):
    s, _ = common.parse("s1_balance", "", lrs="1e-2", steps=3, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    common.check_inputs(s, ("prose", "code"))
    s2, _ = common.parse("s1_balance", "", lrs="1e-2", steps=4, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    with pytest.raises(common.ConfigError, match="steps: 3 -> 4"):
        common.check_inputs(s2, ("prose", "code"))
    wider, _ = common.parse("s1_balance", "", lrs="1e-2,3e-2", steps=3, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    common.check_inputs(wider, ("prose", "code"))  # a wider sweep adds runs to the same grid


def test_unknown_claim_and_missing_corpus(tmp_path):
    r = _cli("-m", "experiments.science", "s9", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("error: unknown claim 's9'"), r.stderr
    r = _cli("-m", "experiments.science", "s1", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none"))
    assert r.returncode == 2 and "python -m data_prep.science" in r.stderr, r.stderr


def test_aggregate_picks_each_methods_best_lr():
    rows = [dict(method="a", lr=1e-3, seed=1, v=3.0), dict(method="a", lr=1e-3, seed=2, v=3.2),
            dict(method="a", lr=1e-2, seed=1, v=2.0), dict(method="a", lr=1e-2, seed=2, v=4.0),
            dict(method="b", lr=1e-2, seed=1, v=1.0)]
    agg = common.aggregate(rows, ["v"], select="v")
    assert agg["a"]["best_lr"] == 1e-2  # mean 3.0 beats 3.1, however wide its spread
    assert agg["a"]["per_lr"][1e-2]["v"] == pytest.approx((3.0, 2 ** 0.5))
    assert agg["b"]["best_lr"] == 1e-2 and agg["b"]["per_lr"][1e-2]["v"] == (1.0, 0.0)


def _fake_trained_run(s, name, after):
    """A run directory as a finished run leaves it (job.yaml, a checkpoints dir, result.json), no trainer."""
    import yaml

    job = common.base_job(s, sources=[{"path": s.domain("code")}], seed=1, lr=1e-3)
    run = common.Run(name, job, after=after, group={"method": "m", "lr": 1e-3, "seed": 1})
    d = common.run_dir(s, run)
    from molm_ds.checkpoint import marker

    tag_dir = os.path.join(d, "checkpoints", f"step_{job['training']['steps']:08d}")
    os.makedirs(tag_dir)  # a tag of one file, with its marker as the trainer writes it
    with open(os.path.join(tag_dir, "job.yaml"), "w") as f:
        yaml.safe_dump(job, f)
    marker.mark_complete(tag_dir, {"kind": "train", "step": job["training"]["steps"]}, marker.digests(tag_dir, ["job.yaml"]))
    with open(os.path.join(d, "job.yaml"), "w") as f:
        yaml.safe_dump(dict(job, name=name, run_dir=d), f)
    return run, d


def test_changed_measurement_remeasures_the_checkpoint_without_training(corpus, tmp_path):
    s, _ = common.parse("s4_prune", "", lrs="1e-3", steps=3, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    mark = ["-c", "import sys; open(sys.argv[1], 'a').write(sys.argv[2])", "{run}/measured.txt"]
    run, d = _fake_trained_run(s, "r", [mark + ["A"]])
    with open(os.path.join(d, common.RESULT), "w") as f:
        json.dump({"seconds": 1.0, "group": run.group, "after": run.after}, f)
    assert common.is_done(s, run) and common._execute(s, run)[1]  # same commands: skipped
    assert not os.path.exists(os.path.join(d, "measured.txt"))
    run.after = [mark + ["B"]]  # e.g. new --taus: the prune command changed
    assert not common.is_done(s, run)
    name, ok, _ = common._execute(s, run)
    assert ok and open(os.path.join(d, "measured.txt")).read() == "B"  # measured again ...
    assert common.read_json(os.path.join(d, common.RESULT))["after"] == run.after and common.is_done(s, run)
    assert "pretrain.py" not in open(os.path.join(d, "log.txt")).read()  # ... without training

    os.remove(os.path.join(d, common.RESULT))  # interrupted after training, before its measurement finished
    run.after = [mark + ["C"]]
    assert common._execute(s, run)[1] and open(os.path.join(d, "measured.txt")).read() == "BC"
    assert common.is_done(s, run)


def test_reuse_needs_the_same_job_and_measurement(corpus, tmp_path):
    s, _ = common.parse("s2_dense", "", lrs="1e-3", steps=3, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    src, sd = _fake_trained_run(s, "src", common.measure_cmds(s, ["prose", "code"]))
    with open(os.path.join(sd, common.RESULT), "w") as f:
        json.dump({"seconds": 1.0, "group": src.group, "after": src.after}, f)
    for windows, expect in ((s.windows, True), (s.windows + 1, False)):
        s2 = common.Settings(**{**vars(s), "windows": windows})
        dst = common.Run(f"dst{windows}", src.job, after=common.measure_cmds(s2, ["prose", "code"]), group=src.group,
                         reuse=sd)
        d = common.run_dir(s, dst)
        os.makedirs(d)
        assert common._copy_reused(dst, dict(src.job, name=dst.name, run_dir=d), d) is expect


def test_measurement_settings_may_change_training_settings_may_not(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "PUBLISHED", str(tmp_path / "published"))  # no committed results for this corpus
    argv = ["--out", str(tmp_path / "g"), "--data", corpus]
    from experiments import s4_prune

    def settings(*more):
        return common.parse("s4_prune", "", lrs="1e-3", steps=3, argv=argv + list(more), extra=s4_prune.extra)[0]

    common.check_inputs(settings("--taus", "0.1"), ("prose", "code"))
    common.check_inputs(settings("--taus", "0.2,0.4", "--windows", "32"), ("prose", "code"))
    with pytest.raises(common.ConfigError, match="base_steps"):
        common.check_inputs(settings("--base-steps", "5"), ("prose", "code"))


def test_other_corpus_is_refused_unless_allowed(corpus, tmp_path, monkeypatch):
    from data_prep.science import corpus_sha256

    monkeypatch.setattr(common, "PUBLISHED", str(tmp_path / "published"))
    os.makedirs(tmp_path / "published" / "s1_balance")
    (tmp_path / "published" / "s1_balance" / "results.json").write_text(json.dumps({"corpus_sha256": "0" * 64}))
    s, _ = common.parse("s1_balance", "", lrs="1e-2", steps=3, argv=["--out", str(tmp_path / "g"), "--data", corpus])
    with pytest.raises(common.ConfigError, match="--allow-other-corpus"):
        common.check_inputs(s, ("prose", "code"))
    s, _ = common.parse("s1_balance", "", lrs="1e-2", steps=3,
                        argv=["--out", str(tmp_path / "g"), "--data", corpus, "--allow-other-corpus"])
    common.check_inputs(s, ("prose", "code"))
    assert s.corpus_sha256 == corpus_sha256(corpus)
    assert json.load(open(tmp_path / "g" / "grid.json"))["corpus_sha256"] == s.corpus_sha256


def test_corpus_hash_names_the_tokens_not_the_directory_or_the_machine(corpus, tmp_path, monkeypatch):
    """The same corpus built in another directory with another CPU count hashes the same, with a
    byte-identical tokenizer (SentencePiece records the output path and thread count in the model; both are
    cleared); one changed token changes the hash."""
    import shutil

    from data_prep.embedded import build_embedded
    from data_prep.science import corpus_sha256

    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    other = str(tmp_path / "elsewhere" / "copy")
    build_embedded(other, vocab_size=512, code_bytes=200_000, workers=1, say=lambda _: None)
    assert open(os.path.join(other, "tokenizer.model"), "rb").read() == open(os.path.join(corpus, "tokenizer.model"), "rb").read()
    assert corpus_sha256(other) == corpus_sha256(corpus)
    changed = str(tmp_path / "changed")
    shutil.copytree(corpus, changed)
    bin_file = sorted(glob.glob(os.path.join(changed, "shards", "code", "*.bin")))[0]
    with open(bin_file, "r+b") as f:
        first = f.read(2)
        f.seek(0)
        f.write(bytes([first[0] ^ 1, first[1]]))
    assert corpus_sha256(changed) != corpus_sha256(corpus)


def _measure(p_prose, p_code, h_x, h):
    subs = lambda p: {"L00/attn": {"p_mean": p, "H_m_given_x_rel": h_x, "H_m_rel": h},
                      "L00/mlp": {"p_mean": p, "H_m_given_x_rel": h_x / 2, "H_m_rel": h / 2}}
    return {"domains": {"prose": {"loss": 3.0, "sublayers": subs(p_prose)}, "code": {"loss": 5.0, "sublayers": subs(p_code)}}}


def test_base_specialisation_by_domain_and_by_token():
    from experiments.s3_continual import specialisation, token_routing

    apart = _measure([1.0, 0.0], [0.0, 1.0], 0.1, 0.9)  # each domain to its own expert
    same = _measure([0.5, 0.5], [0.5, 0.5], 0.1, 0.9)
    assert specialisation(apart) == 1.0 and specialisation(same) == 0.0
    assert token_routing(apart) == pytest.approx((0.075, 0.675))  # mean over sub-layers and domains


def test_s3_bases_only_reports_the_bases_routing(corpus, tmp_path):
    from experiments import s3_continual

    out = str(tmp_path / "s3b")
    args = ["--out", out, "--data", corpus, "--seeds", "1", "--base-steps", "3", "--windows", "16", "--bases-only"]
    assert s3_continual.main(args) == 0
    assert sorted(os.listdir(os.path.join(out, "runs"))) == ["base_s1"]  # no continual run
    m = json.load(open(os.path.join(out, "runs", "base_s1", "measure_test.json")))
    md = open(os.path.join(out, "results.md")).read()
    h_x, h = s3_continual.token_routing(m)
    assert "1/1 base models finished" in md
    assert f"H(m|x)/log E {h_x:.3f} ± 0.000" in md and f"H(m)/log E {h:.3f} ± 0.000" in md
    assert f"0 = none) {s3_continual.specialisation(m):.3f} ± 0.000" in md
    sub = m["domains"]["code"]["sublayers"]["L01/mlp"]
    assert f"| L01/mlp |" in md and f"{sub['H_m_given_x_rel']:.3f} ± 0.000" in md
