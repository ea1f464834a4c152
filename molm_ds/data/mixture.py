"""Weighted mixture of token sources, packed into windows, split over data-parallel ranks.

Order (all deterministic, nothing but counters in the state):
- Each source's windows (see ``packing``) are split once into train / val by blocks of consecutive
  windows with a fixed seed that does not depend on the loader seed, so every run sees the same
  validation windows and they never appear in training.
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


def choose_source(weights: np.ndarray, counts: np.ndarray, g: int) -> int:
    """The mixture rule for global sample g given per-source counts so far."""
    return int(np.argmax(weights * (g + 1) - counts))


class MixtureLoader:
    """Batches ``{"input_ids", "labels"}`` of LongTensor[B, seq_len] from a weighted mixture of sources.

    ``next_batch()`` (or iterate) gives this rank's micro-batch; ``state_dict()`` / ``load_state_dict()``
    resume exactly (the same next batch), also across epochs. Pure numpy/PyTorch, memmap reads.
    """

    def __init__(self, sources, *, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int = 0,
                 dp_world_size: int = 1, split: str = "train", val_fraction: float = 0.01):
        sources = [s if isinstance(s, DataSource) else DataSource(*s) for s in sources]
        if not sources:
            raise ConfigError("MixtureLoader needs at least one DataSource(path, weight)")
        if seq_len < 1 or micro_batch_size < 1:
            raise ConfigError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ConfigError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        for s in sources:
            if not (s.weight > 0 and math.isfinite(s.weight)):
                raise ConfigError(f"source {s.path}: weight must be a positive number, got {s.weight}")
        self.tokenizer = check_sources([s.path for s in sources])  # complete, one tokenizer for all
        self.sources = sources
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.split, self.val_fraction = split, val_fraction
        self.streams = [TokenStream(os.fspath(s.path)) for s in sources]
        self.windows: list[np.ndarray] = []
        for s, st in zip(sources, self.streams):
            try:
                train, val = split_windows(st.num_windows(seq_len), val_fraction)
            except DataError as e:
                raise DataError(f"source {s.path}: {st.num_tokens} tokens give no {split} windows of "
                                f"seq_len={seq_len}: {e}") from None
            mine = train if split == "train" else val
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
            f"{s.path} w={p:.3f} windows={len(x)}" for s, p, x in zip(sources, self.weights, self.windows)))

    # -- order -------------------------------------------------------------------------------
    def _perm(self, i: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(i)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, i, epoch, 0 if self.split == "train" else 1])
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
                "val_fraction": self.val_fraction,
                "sources": [{"path": os.fspath(s.path), "weight": s.weight, "num_tokens": st.num_tokens}
                            for s, st in zip(self.sources, self.streams)]}

    def state_dict(self) -> dict:
        """Identical on every rank; resuming with a different dp_world_size continues the same global order."""
        return {"version": 1, "samples": self._samples, "counts": self._counts.tolist(), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._fingerprint()
        for key in ("seq_len", "seed", "split", "val_fraction"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"loader state has {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                                  "resume with the same data settings")
        theirs = [(s["weight"], s["num_tokens"]) for s in state.get("sources", [])]
        if theirs != [(s["weight"], s["num_tokens"]) for s in mine["sources"]]:
            raise ConfigError(f"loader state was saved for sources {state.get('sources')} but this loader reads "
                              f"{mine['sources']}; the mixture must have the same weights and shard contents")
        self._samples = int(state["samples"])
        self._counts = np.array(state["counts"], dtype=np.int64)
        self._perm_cache.clear()
