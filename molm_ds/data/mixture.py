"""Weighted mixture of token sources, packed into windows, split over data-parallel ranks.

Order (all deterministic, nothing but counters in the state):
- Each source's windows (see ``packing``) are split once into train / val / test with a fixed seed that
  does not depend on the loader seed, so every run sees the same held-out windows and they never appear
  in training. ``split_by="position"`` (the default) holds out blocks of 16 consecutive windows (a
  document can then have windows on both sides); ``split_by="document"`` holds out whole documents
  (drawn in a fixed order until each held-out split has its share of the tokens) and drops the few
  windows that straddle documents of different splits, so no held-out document is ever trained on;
  ``"auto"`` splits by document where the documents allow it (each split gets windows and training keeps
  at least half its share) and by position otherwise. ``test_fraction`` (default 0) adds a test split
  after validation; with test_fraction 0 the position split is the two-way split of earlier versions.
- Global sample g goes to the source i that maximises ``w_i * (g + 1) - c_i`` (c_i = samples it has
  given so far, ties to the lower i): the mixture proportions are exact at every prefix.
- Source i's k-th sample is window ``perm(seed, i, epoch)[k % n_i]`` with ``epoch = k // n_i``: a fresh
  permutation of its split's windows every epoch; sources with fewer windows repeat sooner.
- A global batch is ``micro_batch_size * dp_world_size`` consecutive global samples; rank r takes
  rows ``[r * B, (r + 1) * B)``. Every rank computes the same schedule, so ranks never overlap within
  an epoch of a source and the state (sample counter and per-source counts) is the same on all ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from molm_ds.data.checks import check_sources
from molm_ds.data.packing import TokenStream
from molm_ds.errors import ConfigError, DataError
from molm_ds.log import get_logger

log = get_logger("data")

SPLIT_SEED = 20230604  # fixed: the train/val split must not move when the training seed changes
VAL_BLOCK = 16  # windows per split block (keeps a document's neighbouring windows on one side)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One dataset of the mixture: a shard directory or prefix, and its sampling weight (> 0)."""

    path: str
    weight: float = 1.0


def split_windows(n_windows: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) window indices, disjoint, each sorted. Depends only on n_windows and the fraction."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    all_w = np.arange(n_windows, dtype=np.int64)
    if val_fraction == 0.0:
        return all_w, all_w[:0]
    block = max(1, min(VAL_BLOCK, n_windows // 20))
    n_blocks = math.ceil(n_windows / block)
    n_val = max(1, round(val_fraction * n_blocks))
    if n_val >= n_blocks:
        raise DataError(f"only {n_windows} windows: too few to hold out val_fraction={val_fraction} and keep "
                        "training data; use a shorter seq_len, more data or a smaller val_fraction")
    val_blocks = np.random.default_rng(SPLIT_SEED).permutation(n_blocks)[:n_val]
    is_val = np.zeros(n_blocks, dtype=bool)
    is_val[val_blocks] = True
    is_val_w = np.repeat(is_val, block)[:n_windows]
    return all_w[~is_val_w], all_w[is_val_w]


SPLITS = ("train", "val", "test")
SPLIT_BY = ("position", "document", "auto")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must each be in [0, 1) "
                          "and leave some data for training (their sum below 1)")


def split_windows3(n_windows: int, val_fraction: float, test_fraction: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) window indices by position: blocks of consecutive windows, the first val blocks of
    a fixed permutation to val, the next to test. val is ``split_windows``'s whatever test_fraction is."""
    _check_fractions(val_fraction, test_fraction)
    all_w = np.arange(n_windows, dtype=np.int64)
    if val_fraction == 0.0 and test_fraction == 0.0:
        return all_w, all_w[:0], all_w[:0]
    block = max(1, min(VAL_BLOCK, n_windows // 20))
    n_blocks = math.ceil(n_windows / block)
    n_val = max(1, round(val_fraction * n_blocks)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n_blocks)) if test_fraction > 0 else 0
    if n_val + n_test >= n_blocks:
        raise DataError(f"only {n_windows} windows: too few to hold out val_fraction={val_fraction} and "
                        f"test_fraction={test_fraction} and keep training data; use a shorter seq_len, more data or "
                        "smaller fractions")
    order = np.random.default_rng(SPLIT_SEED).permutation(n_blocks)
    label = np.zeros(n_blocks, dtype=np.int8)  # 0 train, 1 val, 2 test
    label[order[:n_val]] = 1
    label[order[n_val:n_val + n_test]] = 2
    label_w = np.repeat(label, block)[:n_windows]
    return all_w[label_w == 0], all_w[label_w == 1], all_w[label_w == 2]


def document_labels(doc_starts: np.ndarray, n_tokens: int, val_fraction: float, test_fraction: float = 0.0
                    ) -> np.ndarray:
    """Per document 0 (train), 1 (val) or 2 (test): documents in a fixed permutation go to val until it holds
    val_fraction of the tokens, then to test likewise; the rest train."""
    _check_fractions(val_fraction, test_fraction)
    starts = np.asarray(doc_starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, n_tokens))
    label = np.zeros(len(starts), dtype=np.int8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(starts))
    i = 0
    for lab, frac in ((1, val_fraction), (2, test_fraction)):
        got = 0
        while frac > 0 and got < frac * n_tokens and i < len(starts):
            label[order[i]] = lab
            got += int(lengths[order[i]])
            i += 1
    return label


def split_by_document(doc_starts: np.ndarray, n_tokens: int, seq_len: int, val_fraction: float,
                      test_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) window indices by document. doc_starts: the first token of every document
    (ascending, doc_starts[0] == 0). Documents are taken in a fixed permutation: to val until it holds
    val_fraction of the tokens, then to test likewise, the rest train. Window w (tokens w*seq_len ..
    w*seq_len + seq_len) belongs to a split when every document it touches does; the others are dropped.
    Raises DataError when the documents do not allow it (a split without windows, or training left with
    less than half its share of the tokens)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    n_docs = len(starts)
    n_windows = max(n_tokens - 1, 0) // seq_len
    if n_docs == 0 or n_windows == 0:
        raise DataError(f"{n_docs} documents, {n_windows} windows: nothing to split by document")
    lengths = np.diff(np.append(starts, n_tokens))
    label = document_labels(starts, n_tokens, val_fraction, test_fraction)
    first = np.searchsorted(starts, np.arange(n_windows, dtype=np.int64) * seq_len, side="right") - 1
    last = np.searchsorted(starts, np.arange(n_windows, dtype=np.int64) * seq_len + seq_len, side="right") - 1
    out = []
    for lab in (0, 1, 2):
        cum = np.concatenate([[0], np.cumsum(label == lab)])  # documents of this split among the first d
        out.append(np.nonzero(cum[last + 1] - cum[first] == last - first + 1)[0].astype(np.int64))
    train_share = int((lengths * (label == 0)).sum()) / max(n_tokens, 1)
    wanted = [(1, val_fraction, "val"), (2, test_fraction, "test")]
    if any(frac > 0 and len(out[lab]) == 0 for lab, frac, _ in wanted) or len(out[0]) == 0 or \
            train_share < 0.5 * (1.0 - val_fraction - test_fraction):
        raise DataError(f"{n_docs} documents of {n_tokens} tokens cannot be split by document at "
                        f"val_fraction={val_fraction}, test_fraction={test_fraction}, seq_len={seq_len} (windows "
                        f"train/val/test {len(out[0])}/{len(out[1])}/{len(out[2])}, train keeps {train_share:.0%} of "
                        "the tokens); use split_by position or more, shorter documents")
    return out[0], out[1], out[2]


def choose_source(weights: np.ndarray, counts: np.ndarray, g: int) -> int:
    """The mixture rule for global sample g given per-source counts so far."""
    return int(np.argmax(weights * (g + 1) - counts))


def split_source(stream: TokenStream, seq_len: int, val_fraction: float, test_fraction: float, split_by: str
                 ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], str]:
    """((train, val, test) windows, "position" | "document") of one source."""
    if split_by != "position" and (val_fraction > 0 or test_fraction > 0):
        try:
            return split_by_document(stream.document_starts(), stream.num_tokens, seq_len, val_fraction,
                                     test_fraction), "document"
        except DataError:
            if split_by == "document":
                raise
    return split_windows3(stream.num_windows(seq_len), val_fraction, test_fraction), "position"


class MixtureLoader:
    """Batches ``{"input_ids", "labels"}`` of LongTensor[B, seq_len] from a weighted mixture of sources.

    ``next_batch()`` (or iterate) gives this rank's micro-batch; ``state_dict()`` / ``load_state_dict()``
    resume exactly (the same next batch), also across epochs. Pure numpy/PyTorch, memmap reads.
    """

    def __init__(self, sources, *, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int = 0,
                 dp_world_size: int = 1, split: str = "train", val_fraction: float = 0.01,
                 test_fraction: float = 0.0, split_by: str = "position"):
        sources = [s if isinstance(s, DataSource) else DataSource(*s) for s in sources]
        if not sources:
            raise ConfigError("MixtureLoader needs at least one DataSource(path, weight)")
        if seq_len < 1 or micro_batch_size < 1:
            raise ConfigError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ConfigError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split_by not in SPLIT_BY:
            raise ConfigError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
        _check_fractions(val_fraction, test_fraction)
        for s in sources:
            if not (s.weight > 0 and math.isfinite(s.weight)):
                raise ConfigError(f"source {s.path}: weight must be a positive number, got {s.weight}")
        self.tokenizer = check_sources([s.path for s in sources])  # complete, one tokenizer for all
        self.sources = sources
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.split, self.val_fraction, self.test_fraction, self.split_by = split, val_fraction, test_fraction, split_by
        self.streams = [TokenStream(os.fspath(s.path)) for s in sources]
        self.windows: list[np.ndarray] = []
        self.split_kinds: list[str] = []  # per source: "position" or "document" (what auto chose)
        for s, st in zip(sources, self.streams):
            try:
                parts, kind = split_source(st, seq_len, val_fraction, test_fraction, split_by)
            except DataError as e:
                raise DataError(f"source {s.path}: {st.num_tokens} tokens give no {split} windows of "
                                f"seq_len={seq_len}: {e}") from None
            self.split_kinds.append(kind)
            mine = parts[SPLITS.index(split)]
            if len(mine) == 0:
                raise DataError(f"source {s.path}: {st.num_tokens} tokens give no {split} windows of "
                                f"seq_len={seq_len} (val_fraction={val_fraction})")
            self.windows.append(mine)
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = w / w.sum()
        self._samples = 0  # global samples consumed (all ranks)
        self._counts = np.zeros(len(sources), dtype=np.int64)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        log.info("MixtureLoader %s: %s", split, ", ".join(
            f"{s.path} w={p:.3f} windows={len(x)} (split by {k})"
            for s, p, x, k in zip(sources, self.weights, self.windows, self.split_kinds)))

    # -- order -------------------------------------------------------------------------------
    def _perm(self, i: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(i)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, i, epoch, SPLITS.index(self.split) if self.split != "train" else 0])
            cached = (epoch, rng.permutation(len(self.windows[i])))
            self._perm_cache[i] = cached
        return cached[1]

    def _next_sample(self) -> tuple[int, int]:
        i = choose_source(self.weights, self._counts, self._samples)
        k = int(self._counts[i])
        n = len(self.windows[i])
        w = int(self.windows[i][self._perm(i, k // n)[k % n]])
        self._counts[i] += 1
        self._samples += 1
        return i, w

    def next_batch(self) -> dict[str, torch.Tensor]:
        B = self.micro_batch_size
        rows = []
        for j in range(B * self.dp_world_size):
            i, w = self._next_sample()
            if j // B == self.dp_rank:
                rows.append(self.streams[i].window(w, self.seq_len))
        x = torch.from_numpy(np.stack(rows))
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- progress and resume ---------------------------------------------------------------------
    def epochs(self) -> list[float]:
        """Epochs of each source's split consumed so far (fractional)."""
        return [int(c) / len(w) for c, w in zip(self._counts, self.windows)]

    def _fingerprint(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "split": self.split,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "split_by": self.split_by,
                "sources": [{"path": os.fspath(s.path), "weight": s.weight, "num_tokens": st.num_tokens}
                            for s, st in zip(self.sources, self.streams)]}

    def state_dict(self) -> dict:
        """Identical on every rank; resuming with a different dp_world_size continues the same global order."""
        return {"version": 1, "samples": self._samples, "counts": self._counts.tolist(), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        defaults = {"test_fraction": 0.0, "split_by": "position"}  # states saved before the test split
        for key in ("seq_len", "seed", "split", "val_fraction", "test_fraction", "split_by"):
            if state.get(key, defaults.get(key)) != mine[key]:
                raise ConfigError(f"loader state has {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                                  "resume with the same data settings")
        theirs = [(s["weight"], s["num_tokens"]) for s in state.get("sources", [])]
        if theirs != [(s["weight"], s["num_tokens"]) for s in mine["sources"]]:
            raise ConfigError(f"loader state was saved for sources {state.get('sources')} but this loader reads "
                              f"{mine['sources']}; the mixture must have the same weights and shard contents")
        self._samples = int(state["samples"])
        self._counts = np.array(state["counts"], dtype=np.int64)
        self._perm_cache.clear()
