"""molm_ds.perplexity: every target scored exactly once, each with the context the window scheme
promises (against a target-by-target reference), lm-evaluation-harness's rolling windows reproduced, and
the windowed score of a model equal to brute-force per-token log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from molm_ds.perplexity import rolling_windows, rolling_windows_reference, sequences, window_batches, Documents


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 30])
@pytest.mark.parametrize("seq_len,stride", [(8, 8), (8, 3), (8, 1), (1, 1), (5, 4)])
def test_every_target_once_with_the_reference_context(n, seq_len, stride):
    targets = list(range(100, 100 + n))
    seen = {}
    for x, y in rolling_windows(targets, prefix=2, seq_len=seq_len, stride=stride):
        assert len(x) == len(y) <= seq_len
        for j, label in enumerate(y):
            if label != -100:
                i = label - 100
                assert i not in seen
                seen[i] = x[:j + 1]
    assert seen == rolling_windows_reference(targets, prefix=2, seq_len=seq_len, stride=stride)


def _lm_eval_windows(tokens, prefix, max_len):
    """lm-evaluation-harness's get_rolling_token_windows(context_len=1) + make_disjoint_window, restated."""
    out, pred_len, predicted = [], max_len, 0
    first = min(max_len, len(tokens))
    out.append(([prefix] + tokens[:first - 1], tokens[:first]))
    predicted += first
    while predicted < len(tokens):
        wl = min(len(tokens) - predicted, pred_len)
        end = predicted + wl
        ctx, cont = tokens[end - max_len - 1:end - 1], tokens[end - wl:end]
        out.append((ctx, cont))
        predicted += wl
    return out


def test_stride_equal_to_seq_len_is_lm_evals_scheme():
    pytest.importorskip("lm_eval")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 5, 8, 9, 20, 33):
        tokens = list(range(10, 10 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=2, max_seq_len=8,
                                                                             context_len=1)]
        ours = rolling_windows(tokens, prefix=2, seq_len=8, stride=8)
        assert len(ours) == len(theirs)
        for (x, y), (ctx, cont) in zip(ours, theirs):
            full = ctx + cont  # the harness scores cont after ctx; the model sees full[:-1]
            assert x == full[:-1][-len(x):] and [t for t in y if t != -100] == cont


def test_scored_loss_equals_brute_force():
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.train.evaluate import evaluate

    torch.manual_seed(0)
    model = MoLM(ModelConfig.from_preset("tiny", vocab_size=64)).eval()
    docs = Documents("x", [list(range(5, 25)), [7, 8, 9], list(range(30, 61))], None)
    seqs = sequences(docs, eos_id=2, context="document")
    L, S = 8, 3
    windows = [w for s in seqs for w in rolling_windows(s, prefix=2, seq_len=L, stride=S)]
    res = evaluate(model, window_batches(windows, batch_size=4, pad_id=3))
    want, n = 0.0, 0
    for s in seqs:
        for i, ctx in rolling_windows_reference(s, prefix=2, seq_len=L, stride=S).items():
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].double(), -1)
            want -= float(logp[s[i]])
            n += 1
    assert res.tokens == n == sum(len(s) for s in seqs)
    assert res.loss == pytest.approx(want / n, rel=1e-5)


def test_stream_and_score_eos():
    docs = Documents("x", [[5, 6], [7]], None)
    assert sequences(docs, eos_id=2, context="stream") == [[5, 6, 2, 7, 2]]
    assert sequences(docs, eos_id=2, context="document", score_eos=True) == [[5, 6, 2], [7, 2]]
    assert sequences(docs, eos_id=2) == [[5, 6], [7]]


def test_bits_per_byte():
    from molm_ds.perplexity import bits_per_byte

    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_byte(1.0, 10, None) is None


def test_read_documents_split_keeps_the_loaders_held_out_documents(tmp_path):
    """--split: the documents of a held-out split are exactly those the loader holds out by document."""
    import numpy as np

    from molm_ds.data.indexed import IndexedShard
    from molm_ds.data.mixture import document_labels
    from molm_ds.data.packing import TokenStream
    from molm_ds.perplexity import read_documents
    from molm_ds.testing import write_shard

    shard = write_shard(tmp_path / "s", n_docs=30, doc_len=50, seed=4)
    st = TokenStream(shard)
    labels = document_labels(st.document_starts(), st.num_tokens, 0.2, 0.2)
    docs = [np.asarray(IndexedShard(str(tmp_path / "s" / "part-00000"))[i])[:-1].tolist() for i in range(30)]
    got = {name: read_documents(shard, None, split=(name, 0.2, 0.2)).ids for name in ("train", "val", "test")}
    for lab, name in enumerate(("train", "val", "test")):
        assert got[name] == [d for d, l in zip(docs, labels) if l == lab]
    assert len(got["test"]) >= 1 and sum(map(len, got.values())) == 30


def test_evaluate_split_refuses_a_position_split_and_a_missing_test_fraction():
    import argparse

    import pytest

    from launch.evaluate import resolve_split
    from molm_ds.errors import ConfigError

    def args(split, **kw):
        return argparse.Namespace(split=split, data=["shards/x"], val_fraction=None, test_fraction=None, **kw)

    assert resolve_split(args("all"), {}) is None
    with pytest.raises(ConfigError, match="splits its data by position"):
        resolve_split(args("test"), {"data": {"seq_len": 8, "split_by": "position", "test_fraction": 0.1}})
    with pytest.raises(ConfigError, match="test fraction is 0"):
        resolve_split(args("test"), {"data": {"seq_len": 8, "split_by": "document"}})
    assert resolve_split(args("val"), {"data": {"seq_len": 8, "split_by": "document", "val_fraction": 0.2}}) == \
        ("val", 0.2, 0.0)
