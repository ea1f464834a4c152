"""Checks that the data of a job fit together and fit the model, run before anything is built.

    from molm_ds.data import check_sources
    info = check_sources(["/data/shards/pile_en", "/data/shards/cc100_sw"], model_vocab_size=32000)

Every source must be complete (``manifest.source_shards``) with its shard files at the sizes the
manifest promises (and, where the manifest records them, the sampled hashes of their bytes); the
tokenizer file a manifest names, when it is there, must still have the SHA-256 recorded; all sources with a manifest must come from one tokenizer (its SHA-256, so two
tokenizers of the same vocabulary size are told apart); and that tokenizer's ids must fit the
model's embedding (``vocab_size >= the tokenizer's``; a larger, padded model vocabulary is fine).
Sources without a manifest (plain Megatron shards) carry no tokenizer and are only size-checked
against their own index when read.
"""

from __future__ import annotations

import os

from molm_ds.data.manifest import BUILD_HELP, MANIFEST, TokenizerInfo, check_shard_files, source_shards, tokenizer_info
from molm_ds.errors import DataError


def _source_tokenizer(path: str) -> TokenizerInfo | None:
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
        return None
    return tokenizer_info(directory)


def _describe(path: str, info: TokenizerInfo) -> str:
    return f"{path} (tokenizer {info.model_path or '?'}, sha256 {info.sha256[:12]}..., vocab {info.vocab_size})"


def check_sources(paths, *, model_vocab_size: int | None = None) -> TokenizerInfo | None:
    """Raise DataError unless the sources can be trained on together (see the module docstring); returns
    their tokenizer (None when no source has a manifest)."""
    found: list[tuple[str, TokenizerInfo]] = []
    for p in map(os.fspath, paths):
        check_shard_files(source_shards(p))
        info = _source_tokenizer(p)
        if info is not None:
            found.append((p, info))
    if not found:
        return None
    first_path, first = found[0]
    others = [(p, i) for p, i in found[1:] if i.sha256 != first.sha256]
    if others:
        p, i = others[0]
        raise DataError("data sources were tokenised with different tokenizers: " + _describe(first_path, first)
                        + " vs " + _describe(p, i) + f"; rebuild {p} with python -m data_prep.build_shards "
                        f"--tokenizer {first.model_path or 'THE_FIRST_SOURCES_TOKENIZER'} (or drop it from the mixture)")
    if first.model_path and os.path.isfile(first.model_path) and first.sha256:
        from data_prep.identity import file_sha256

        have = file_sha256(first.model_path)
        if have != first.sha256:
            raise DataError(f"tokenizer {first.model_path} changed since {first_path} was built with it (sha256 "
                            f"{have[:12]}... now, {first.sha256[:12]}... in the manifest): restore that tokenizer, "
                            f"or rebuild the shards with {BUILD_HELP}")
    if model_vocab_size is not None and first.vocab_size > model_vocab_size:
        raise DataError(f"data source {first_path} uses a tokenizer of {first.vocab_size} tokens but the model has "
                        f"vocab_size={model_vocab_size}: set model.overrides.vocab_size >= {first.vocab_size}")
    return first
