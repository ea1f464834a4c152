import json

from molm_ds.train.metrics import MetricsWriter, format_duration, format_progress


def test_progress_line_has_step_loss_throughput_and_eta():
    line = format_progress(10, 200, {"loss": 5.12345, "lm_loss": 5.1, "lr": 3e-4, "grad_norm": 1.25,
                                     "tokens_per_s": 12345.6}, 83)
    assert line == "step 10/200 | loss 5.1235 (lm 5.1000) | lr 3.00e-04 | gnorm 1.250 | 12,346 tok/s | ETA 1m23s"
    assert "val 2.0000 (ppl 7.39)" in format_progress(1, 2, {"val_loss": 2.0, "val_ppl": 7.389}, 0)
    assert format_duration(3725) == "1h02m05s" and format_duration(float("inf")) == "?"


def test_writer_appends_and_cuts_back_on_resume(tmp_path):
    p = tmp_path / "m.jsonl"
    w = MetricsWriter(str(p))
    for s in (1, 2, 3):
        w(s, {"loss": float(s)})
    MetricsWriter(str(p), resume_step=2)(3, {"loss": 30.0})
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsWriter(str(p))  # a fresh start truncates
    assert p.read_text() == ""
