"""Training data: Megatron indexed shards by memmap, packing into windows, weighted mixtures.

Public API: ``MixtureLoader``, ``DataSource``, ``IndexedShard``, ``TokenStream``, ``read_manifest``,
``tokenizer_info``, ``shard_prefixes``, ``check_sources``. See docs/data.md. Names are imported lazily so that
data_prep can use the shard format without importing torch.
"""

import importlib

_WHERE = {
    "IndexedShard": "indexed", "best_dtype": "indexed",
    "TokenizerInfo": "manifest", "read_manifest": "manifest", "shard_prefixes": "manifest", "tokenizer_info": "manifest",
    "check_sources": "checks", "source_shards": "manifest", "ShardEntry": "manifest",
    "DataSource": "mixture", "MixtureLoader": "mixture", "split_windows": "mixture",
    "split_windows3": "mixture", "split_by_document": "mixture",
    "TokenStream": "packing", "pack_reference": "packing",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"molm_ds.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'molm_ds.data' has no attribute {name!r}")
