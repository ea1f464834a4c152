"""What the evaluate / generate / export commands load: a model and what it needs, from either a trainer
checkpoint or a Hugging Face directory.

    src = load_source("runs/demo/checkpoints")    # or "runs/demo/hf" (ours) or a released MoLM directory
    src.model, src.tokenizer_path, src.context_length, src.job

- trainer checkpoint (a checkpoint directory = its newest complete tag, or a step_NNNNNNNN tag):
  ``molm_ds.checkpoint.load_fp32_model`` (bf16/fp16 runs: the fp32 master weights; ``masters=False``
  keeps the saved low-precision weights); tokenizer from its job's data manifests (a given or found
  tokenizer whose SHA-256 differs from the manifests' record is refused), context from ``data.seq_len``;
- Hugging Face directory (``config.json``): ``molm_ds.interop.load_moduleformer``; tokenizer the
  directory's own ``tokenizer.model`` / ``tokenizer.json``, context ``n_positions``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Source", "load_source", "is_hf_dir"]


@dataclass
class Source:
    model: object  # molm_ds.model.MoLM, eval mode, CPU, fp32
    kind: str  # "checkpoint" or "hf"
    where: str  # the tag directory or the HF directory
    tokenizer_path: Optional[str]  # SentencePiece model file or a directory with tokenizer files
    context_length: Optional[int]  # the sequence length it was trained on, when known
    job: dict = field(default_factory=dict)  # the checkpoint's job ({} for a HF directory)
    masters: bool = False  # fp32 masters were read from optimizer shards


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_source(path: str, *, tokenizer: Optional[str] = None, masters: bool = True, what: str = "--checkpoint") -> Source:
    """``tokenizer`` overrides the one found with the model."""
    from molm_ds import checkpoint as ckpt
    from molm_ds.tokenizer import check_run_tokenizer, find_run_tokenizer

    if is_hf_dir(path):
        from molm_ds.interop import load_moduleformer

        try:
            model = load_moduleformer(path)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{what} {path}: {e}") from None
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        own = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.model", "tokenizer.json"))
        return Source(model.eval(), "hf", path, tokenizer or (path if own else None), hf.get("n_positions"))
    d, tag = ckpt.resolve(path, what=what)
    job = ckpt.read_job(d, tag)
    tok_path = tokenizer or find_run_tokenizer(job)
    check_run_tokenizer(tok_path, job, what="--tokenizer" if tokenizer else "tokenizer")
    load = ckpt.load_fp32_model if masters else ckpt.load_model
    model = load(os.path.join(d, tag), what=what).float().eval()
    return Source(model, "checkpoint", os.path.join(d, tag), tok_path,
                  (job.get("data") or {}).get("seq_len"), job, masters=masters and ckpt.has_fp32_masters(d, tag))
