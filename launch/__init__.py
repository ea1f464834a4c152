"""The command-line entry points; installed as ``molm_ds.launch`` (console scripts ``molm-train``,
``molm-prune``, ``molm-eval``, ``molm-generate``, ``molm-export``), run from the checkout as scripts
(``python launch/pretrain.py``, ``deepspeed launch/pretrain.py``)."""
