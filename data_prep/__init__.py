"""Raw corpora -> SentencePiece tokenizer -> Megatron indexed token shards.

Commands (each has --help): ``python -m data_prep.train_tokenizer``, ``python -m data_prep.build_shards``,
``python -m data_prep.embedded``, ``python -m data_prep.identity``. See docs/data.md.
"""
