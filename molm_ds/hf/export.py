"""A molm-ds model as a Hugging Face directory that a user can push to the hub.

    export_hf(model, "out/molm-hf", tokenizer="data/embedded/tokenizer.model", context_length=64)

writes
    config.json                 released ModuleFormer keys + molm-ds keys (``interop.hf_config``), ``auto_map``,
                                special-token ids, ``n_positions`` (the trained context length)
    configuration_molm.py, modeling_molm.py   this project's modeling code (``trust_remote_code=True``)
    model.safetensors           the weights in the released layout (``interop.key_map``); above
                                ``max_shard_bytes`` shards + ``model.safetensors.index.json``
    generation_config.json      BOS/EOS/PAD ids, greedy by default
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model   (``molm_ds.hf.tokenizer``)
    README.md                   a model card: what it is and how to load it

When the released ModuleFormer code can build the model (``interop.ibm_incompatibilities`` is empty) the
config says ``model_type: moduleformer`` with the real expert counts, so the same directory also loads
in IBM's code; otherwise ``model_type: molm`` (the released code would build the wrong model).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from molm_ds import interop
from molm_ds.errors import ConfigError
from molm_ds.log import get_logger

__all__ = ["export_hf", "write_safetensors", "MODELING_FILES", "DTYPES"]

log = get_logger("hf.export")

HERE = os.path.dirname(os.path.abspath(__file__))
MODELING_FILES = ("configuration_molm.py", "modeling_molm.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 2**30


def _flavour(ibm_ok: bool) -> tuple[str, str, str]:
    """(model_type, config class, model class) of the auto_map."""
    if ibm_ok:
        return "moduleformer", "MoLMModuleFormerConfig", "MoLMModuleFormerForCausalLM"
    return "molm", "MoLMConfig", "MoLMForCausalLM"


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Optional[dict] = None, name: str = "model") -> list[str]:
    """``name.safetensors``, or ``name-0000i-of-0000n.safetensors`` + ``name.safetensors.index.json`` when
    the tensors exceed ``max_shard_bytes`` (Hugging Face's sharded layout). Returns the files written."""
    from molm_ds.paths import save_safetensors

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(out_dir, f"{name}.safetensors"), metadata=meta)
        return [f"{name}.safetensors"]
    files = [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for f, shard in zip(files, shards):
        save_safetensors(shard, os.path.join(out_dir, f), metadata=meta)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: f for f, shard in zip(files, shards) for k in shard}}
    with open(os.path.join(out_dir, f"{name}.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    return files + [f"{name}.safetensors.index.json"]


def _model_card(cfg, hf: dict, *, model_type: str, ibm_why: list[str], source: str) -> str:
    counts = ("per layer: attention " + str(hf["n_att_experts_per_layer"]) if "n_att_experts_per_layer" in hf
              else f"{hf['n_att_experts']} attention experts per layer")
    mlp = ("MLP " + str(hf["n_mlp_experts_per_layer"]) if "n_mlp_experts_per_layer" in hf
           else f"{hf['n_mlp_experts']} MLP experts per layer")
    ibm = ("It also loads in IBM's ModuleFormer code (`model_type: moduleformer`, real expert counts)."
           if not ibm_why else "IBM's ModuleFormer code cannot build it: " + "; ".join(ibm_why) + ".")
    return f"""---
library_name: transformers
tags: [molm, moduleformer, mixture-of-experts]
---
# MoLM exported by molm-ds

A ModuleFormer / MoLM (arXiv 2306.04640) sparse mixture-of-experts language model: {cfg.n_layer} layers,
d_model {cfg.d_model}, {counts}, {mlp}, k = {cfg.k_att} (attention) / {cfg.k_mlp} (MLP),
{cfg.total_params:,} parameters ({cfg.active_params:,} active per token), trained context {hf['n_positions']} tokens.
Exported from `{source}`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR)
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
ids = tok("def add(a, b):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))
```

`model_type: {model_type}`. {ibm}
The tokenizer is the run's SentencePiece model (`tokenizer.model`) with identical ids; documents were
trained with EOS between them and no BOS, so EOS is also the BOS token.
Evaluate with `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks ...`.
"""


def export_hf(model, out_dir: str, *, tokenizer: Optional[str], context_length: int, dtype: str = "float32",
              source: str = "molm-ds", max_shard_bytes: int = DEFAULT_SHARD_BYTES, replace: bool = False) -> dict:
    """Write ``model`` (a plain molm_ds MoLM) as a Hugging Face directory ``out_dir`` (created; must be
    empty or absent unless ``replace``, which deletes it first). ``tokenizer``: the run's SentencePiece
    model (None: no tokenizer files, special ids unset). Returns a summary (files, model_type, why IBM's
    code cannot load it)."""
    from molm_ds.hf import tokenizer as hf_tok

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if replace and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new directory (or delete it)")
    cfg = model.config
    hf = interop.hf_config(cfg)
    ibm_why = interop.ibm_incompatibilities(cfg)
    model_type, config_class, model_class = _flavour(not ibm_why)
    special = hf_tok.special_tokens(tokenizer) if tokenizer else None
    if special is not None:
        from molm_ds.data.manifest import tokenizer_info

        vocab = tokenizer_info(tokenizer).vocab_size
        if vocab > cfg.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer} has {vocab} pieces but the model only {cfg.vocab_size} rows: "
                              "not the tokenizer this model was trained with")

    os.makedirs(out_dir, exist_ok=True)
    inverse = {ours: theirs for theirs, ours in interop.key_map(cfg).items()}
    sd = model.state_dict()
    extra = sorted(set(sd) - set(inverse))
    if extra:
        raise ConfigError(f"export: parameters with no Hugging Face name: {extra[:8]}")
    # the balancing bias stays fp32 in every dtype: its steps are finer than bf16 resolves
    files = write_safetensors({inverse[k]: v.float() if k.endswith("expert_bias_E") else v.to(DTYPES[dtype])
                               for k, v in sd.items()}, out_dir,
                              max_shard_bytes=max_shard_bytes)
    for f in MODELING_FILES:
        shutil.copyfile(os.path.join(HERE, f), os.path.join(out_dir, f))
    ids = ({"bos_token_id": special.bos_id, "eos_token_id": special.eos_id, "pad_token_id": special.pad_id}
           if special else {})
    config = {
        "architectures": [model_class], "model_type": model_type,
        "auto_map": {"AutoConfig": f"configuration_molm.{config_class}",
                     "AutoModelForCausalLM": f"modeling_molm.{model_class}"},
        **hf, "n_positions": context_length, "use_cache": True, "torch_dtype": dtype, **ids,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, **ids}, f, indent=2)
    if tokenizer:
        hf_tok.write_tokenizer(tokenizer, out_dir)  # no length limit: n_positions holds the trained context
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_model_card(cfg, config, model_type=model_type, ibm_why=ibm_why, source=source))
    log.info("exported %s (model_type %s, %s) to %s", source, model_type, dtype, out_dir)
    return {"dir": out_dir, "model_type": model_type, "ibm_compatible": not ibm_why, "ibm_incompatibilities": ibm_why,
            "weights": files, "tokenizer": bool(tokenizer), "dtype": dtype, **ids}
