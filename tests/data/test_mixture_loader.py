"""Packing, split and mixture loader against brute force; determinism, rank disjointness, exact resume."""

import numpy as np
import pytest
import torch

from data_prep.indexed_writer import IndexedShardWriter
from molm_ds.data import (
    DataSource, MixtureLoader, TokenStream, pack_reference, split_by_document, split_windows, split_windows3,
)
from molm_ds.data.mixture import choose_source
from molm_ds.errors import DataError

EOS = 2


def make_source(path, docs_per_shard, seed):
    """Write a source as several shards of random documents; returns the documents (without EOS)."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    all_docs = []
    for s, n_docs in enumerate(docs_per_shard):
        docs = [rng.integers(3, 500, size=int(rng.integers(1, 40))).tolist() for _ in range(n_docs)]
        w = IndexedShardWriter(str(path / f"part-{s:05d}"), np.uint16)
        if docs:
            w.add_documents(np.array([t for d in docs for t in d + [EOS]]), np.array([len(d) + 1 for d in docs]))
        w.finish()
        all_docs += docs
    return all_docs


@pytest.fixture
def two_sources(tmp_path):
    a = make_source(tmp_path / "a", [30, 0, 25], seed=1)  # an empty shard in the middle
    b = make_source(tmp_path / "b", [12], seed=2)
    return [(str(tmp_path / "a"), a), (str(tmp_path / "b"), b)]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_windows_match_reference_packing(two_sources, seq_len):
    path, docs = two_sources[0]
    st = TokenStream(path)
    ref = pack_reference(docs, EOS, seq_len)
    assert st.num_windows(seq_len) == len(ref)
    assert [st.window(w, seq_len).tolist() for w in range(len(ref))] == ref


def test_split_is_disjoint_covering_and_seed_free():
    for n in (2, 21, 100, 1000):
        tr, va = split_windows(n, 0.1)
        assert len(np.intersect1d(tr, va)) == 0 and sorted(np.concatenate([tr, va]).tolist()) == list(range(n))
        assert len(va) >= 1 and len(tr) >= 1
    with pytest.raises(ValueError, match="too few"):
        split_windows(1, 0.5)


def reference_batches(sources, weights, *, seq_len, B, world, rank, seed, split, val_fraction, steps):
    """Brute force: materialise every window, then follow the documented order with plain loops."""
    w = np.array(weights, dtype=np.float64) / sum(weights)
    wins = []
    for path, docs in sources:
        ref = pack_reference(docs, EOS, seq_len)
        tr, va = split_windows(len(ref), val_fraction)
        wins.append([ref[i] for i in (tr if split == "train" else va)])
    counts = [0] * len(sources)
    out, g = [], 0
    for _ in range(steps):
        rows = []
        for j in range(B * world):
            i = int(np.argmax([w[s] * (g + 1) - counts[s] for s in range(len(sources))]))
            k, n = counts[i], len(wins[i])
            perm = np.random.default_rng([seed, i, k // n, 0 if split == "train" else 1]).permutation(n)
            if j // B == rank:
                rows.append(wins[i][perm[k % n]])
            counts[i] += 1
            g += 1
        out.append(torch.tensor(rows))
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_loader_matches_reference(two_sources, split):
    kw = dict(seq_len=16, micro_batch_size=3, seed=5, dp_world_size=2, split=split, val_fraction=0.1)
    for rank in range(2):
        L = MixtureLoader([DataSource(p, wt) for (p, _), wt in zip(two_sources, [0.7, 0.3])], dp_rank=rank, **kw)
        ref = reference_batches(two_sources, [0.7, 0.3], B=3, world=2, rank=rank, steps=40, seed=5,
                                seq_len=16, split=split, val_fraction=0.1)
        for r in ref:  # 40 steps run well past one epoch of both sources
            b = L.next_batch()
            assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (3, 16)
            assert torch.equal(b["input_ids"], r[:, :-1]) and torch.equal(b["labels"], r[:, 1:])
        assert min(L.epochs()) > 1


def test_mixture_proportions_exact():
    w = np.array([0.7, 0.2, 0.1])
    counts = np.zeros(3, dtype=np.int64)
    for g in range(1000):
        counts[choose_source(w, counts, g)] += 1
        assert np.all(np.abs(counts - w * (g + 1)) <= 1.0)


def test_ranks_disjoint_within_epoch(two_sources):
    path, docs = two_sources[0]
    seen = {}
    for rank in range(4):
        L = MixtureLoader([DataSource(path)], seq_len=8, micro_batch_size=2, seed=0, dp_rank=rank,
                          dp_world_size=4, val_fraction=0.0)
        n_steps = L.streams[0].num_windows(8) // 8  # global batch 8: stay within one epoch
        seen[rank] = {tuple(x) for _ in range(n_steps) for x in L.next_batch()["input_ids"].tolist()}
    for r in range(4):
        for q in range(r):
            assert not seen[r] & seen[q]


def test_train_val_disjoint(two_sources):
    path, _ = two_sources[0]
    tr = MixtureLoader([DataSource(path)], seq_len=8, micro_batch_size=4, seed=0, split="train", val_fraction=0.2)
    va = MixtureLoader([DataSource(path)], seq_len=8, micro_batch_size=4, seed=123, split="val", val_fraction=0.2)
    t = {tuple(x) for _ in range(20) for x in tr.next_batch()["input_ids"].tolist()}
    v = {tuple(x) for _ in range(5) for x in va.next_batch()["input_ids"].tolist()}
    assert v and not t & v


def test_seed_determinism(two_sources):
    srcs = [DataSource(p, 1.0) for p, _ in two_sources]
    a, b, c = (MixtureLoader(srcs, seq_len=8, micro_batch_size=2, seed=s) for s in (1, 1, 2))
    xa, xb, xc = ([L.next_batch()["input_ids"] for _ in range(5)] for L in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(xa, xb))
    assert not all(torch.equal(x, y) for x, y in zip(xa, xc))


@pytest.mark.parametrize("resume_at", [1, 9, 31])  # 31: after both sources started new epochs
def test_exact_resume(two_sources, resume_at):
    srcs = [DataSource(p, wt) for (p, _), wt in zip(two_sources, [0.6, 0.4])]
    kw = dict(seq_len=16, micro_batch_size=4, seed=3, dp_rank=1, dp_world_size=2)
    full = MixtureLoader(srcs, **kw)
    batches = [full.next_batch() for _ in range(resume_at + 10)]
    first = MixtureLoader(srcs, **kw)
    for _ in range(resume_at):
        first.next_batch()
    state = first.state_dict()
    resumed = MixtureLoader(srcs, **kw)
    resumed.load_state_dict(state)
    for b in batches[resume_at:]:
        nb = resumed.next_batch()
        assert torch.equal(nb["input_ids"], b["input_ids"]) and torch.equal(nb["labels"], b["labels"])
    it = iter(resumed)
    assert next(it)["input_ids"].shape == (4, 16)


def test_resume_refuses_other_settings(two_sources):
    srcs = [DataSource(p) for p, _ in two_sources]
    st = MixtureLoader(srcs, seq_len=8, micro_batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        MixtureLoader(srcs, seq_len=8, micro_batch_size=2, seed=1).load_state_dict(st)
    with pytest.raises(ValueError, match="weights"):
        MixtureLoader([DataSource(srcs[0].path, 2.0), srcs[1]], seq_len=8, micro_batch_size=2, seed=0).load_state_dict(st)


def test_bad_arguments(two_sources):
    p = two_sources[1][0]
    with pytest.raises(ValueError, match="weight"):
        MixtureLoader([DataSource(p, 0.0)], seq_len=8, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no train windows"):
        MixtureLoader([DataSource(p)], seq_len=10**6, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        MixtureLoader([DataSource(p)], seq_len=8, micro_batch_size=1, seed=0, dp_rank=2, dp_world_size=2)
    with pytest.raises(DataError, match="neither a shard directory nor a prefix"):
        MixtureLoader([DataSource(p + "/nope")], seq_len=8, micro_batch_size=1, seed=0)


def test_three_way_position_split_keeps_val_and_is_disjoint():
    for n in (21, 100, 1000):
        tr2, va2 = split_windows(n, 0.1)
        tr, va, te = split_windows3(n, 0.1, 0.1)
        assert va.tolist() == va2.tolist()  # adding a test split does not move validation
        assert set(te.tolist()) <= set(tr2.tolist()) and len(te) >= 1
        assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(n))
    with pytest.raises(ValueError, match="sum below 1"):
        split_windows3(100, 0.6, 0.5)


def document_split_reference(docs, seq_len, val_fraction, test_fraction):
    """Slow path: label every token with its document's split, keep windows whose tokens share one label."""
    from molm_ds.data.mixture import SPLIT_SEED

    lengths = [len(d) + 1 for d in docs]
    n_tok = sum(lengths)
    label = [0] * len(docs)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs)).tolist()
    i = 0
    for lab, frac in ((1, val_fraction), (2, test_fraction)):
        got = 0
        while frac > 0 and got < frac * n_tok and i < len(docs):
            label[order[i]] = lab
            got += lengths[order[i]]
            i += 1
    tok_label = [lab for d, lab in zip(lengths, label) for _ in range(d)]
    out = {0: [], 1: [], 2: []}
    for w in range((n_tok - 1) // seq_len):
        labs = set(tok_label[w * seq_len: w * seq_len + seq_len + 1])
        if len(labs) == 1:
            out[labs.pop()].append(w)
    return out


@pytest.mark.parametrize("seq_len", [4, 16])
def test_document_split_matches_reference_and_never_shares_a_document(two_sources, seq_len):
    path, docs = two_sources[0]
    st = TokenStream(path)
    starts = st.document_starts()
    assert len(starts) == len(docs) and starts[0] == 0
    got = split_by_document(starts, st.num_tokens, seq_len, 0.15, 0.15)
    ref = document_split_reference(docs, seq_len, 0.15, 0.15)
    assert [g.tolist() for g in got] == [ref[0], ref[1], ref[2]]
    assert all(len(g) for g in got)
    loaders = {sp: MixtureLoader([DataSource(path)], seq_len=seq_len, micro_batch_size=2, seed=0, split=sp,
                                 val_fraction=0.15, test_fraction=0.15, split_by="document")
               for sp in ("train", "val", "test")}
    assert [loaders[sp].windows[0].tolist() for sp in ("train", "val", "test")] == [ref[0], ref[1], ref[2]]
    assert loaders["test"].split_kinds == ["document"]


def test_auto_falls_back_to_position_when_documents_do_not_allow(tmp_path):
    make_source(tmp_path / "one", [1], seed=3)  # one document: no held-out document leaves training data
    path = str(tmp_path / "one")
    with pytest.raises(DataError, match="cannot be split by document"):
        MixtureLoader([DataSource(path)], seq_len=2, micro_batch_size=1, seed=0, split="test", val_fraction=0.1,
                      test_fraction=0.1, split_by="document")
    auto = MixtureLoader([DataSource(path)], seq_len=2, micro_batch_size=1, seed=0, split="test", val_fraction=0.1,
                         test_fraction=0.1, split_by="auto")
    assert auto.split_kinds == ["position"]
    st = TokenStream(path)
    assert auto.windows[0].tolist() == split_windows3(st.num_windows(2), 0.1, 0.1)[2].tolist()
