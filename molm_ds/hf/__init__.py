"""Hugging Face export: a directory with this project's modeling code, the run's tokenizer and the weights.

``export_hf`` (``molm_ds.hf.export``) writes it; ``configuration_molm.py`` / ``modeling_molm.py`` are the
files copied into it (they import transformers, so nothing here imports them); ``molm_ds.hf.tokenizer``
converts the SentencePiece model. See docs/export.md.
"""

from molm_ds.hf.export import export_hf

__all__ = ["export_hf"]
