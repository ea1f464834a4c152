"""The job's data: the training mixture for this rank and fixed validation windows.

Ranks read disjoint rows of every global batch (``MixtureLoader`` with dp_rank / dp_world_size); the
loader's state is identical on every rank and goes into each checkpoint, so a resumed run trains on
exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Optional

from molm_ds.train.job import JobConfig

__all__ = ["TrainData", "check_vocab"]


class TrainData:
    def __init__(self, job: JobConfig, rank: int, world: int) -> None:
        from molm_ds.data import DataSource, MixtureLoader

        d = job.data
        self.loader_kw = dict(sources=[DataSource(s.path, s.weight) for s in d.sources], seq_len=d.seq_len,
                              micro_batch_size=job.training.micro_batch_size, seed=job.training.seed, dp_rank=rank,
                              dp_world_size=world, val_fraction=d.val_fraction,
                              test_fraction=d.test_fraction, split_by=d.split_by)
        self.train = MixtureLoader(split="train", **self.loader_kw)
        self.eval_batches = d.eval_batches

    def val_batches(self, paths: Optional[list[str]] = None) -> list[dict]:
        """``eval_batches`` validation micro-batches of this rank: of the job's mixture, or of ``paths``
        (other sources read with the same windows, e.g. continual learning's old and new domains)."""
        from molm_ds.data import DataSource, MixtureLoader

        kw = self.loader_kw if paths is None else {**self.loader_kw, "sources": [DataSource(p) for p in paths]}
        val = MixtureLoader(split="val", **kw)
        return [val.next_batch() for _ in range(self.eval_batches)]


def check_vocab(job: JobConfig) -> None:
    """DataError unless the sources are complete, share one tokenizer and it fits the model's vocabulary
    (``molm_ds.data.check_sources``)."""
    from molm_ds.data import check_sources

    check_sources([s.path for s in job.data.sources], model_vocab_size=job.build_model_config().vocab_size)
