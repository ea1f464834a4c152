"""molm_ds.hf.export: molm-ds -> Hugging Face directory -> transformers (trust_remote_code) gives the
same logits (within 1e-5 relative) and token-identical greedy generation (KV cache, also batched with left
padding), for the shape of every preset, the model options, and pruned models (uniform and per-layer
counts); the config carries the real expert counts and the right model_type."""

from __future__ import annotations

import json
import os

import pytest
import torch

from molm_ds.config import ModelConfig
from molm_ds.model import MoLM
from molm_ds.testing import EXPORT_MODELS, perturbed

MODELS = EXPORT_MODELS


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_logits_and_greedy_generation(name, tmp_path):
    from molm_ds.hf import export_hf

    model = MODELS[name]()
    info = export_hf(model, str(tmp_path / "hf"), tokenizer=None, context_length=64)
    hf = _load(str(tmp_path / "hf"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=g)
    with torch.no_grad():
        want, got = model(ids).logits, hf(ids).logits
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-5, _rel(got, want)
        assert torch.equal(hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False), model.generate(ids[:, :6], 10))
        # the KV cache and left padding: a short prompt padded in a batch with a long one
        short, long_ = ids[0, :4], ids[1, :9]
        batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long_])
        mask = torch.ones_like(batch)
        mask[0, :5] = 0
        out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[0, 5:], model.generate(short[None], 6)[0])
        assert torch.equal(out[1], model.generate(long_[None], 6)[0])
    from molm_ds.interop import ibm_incompatibilities

    assert info["ibm_compatible"] == (not ibm_incompatibilities(model.config))


def test_config_counts_and_model_type(tmp_path):
    from molm_ds.hf import export_hf
    from molm_ds.interop import config_from_hf

    for name, want_type in (("pruned-uniform", "moduleformer"), ("pruned-per-layer", "molm"),
                            ("preset-molm-350m-4b", "moduleformer"), ("preset-tiny", "molm")):
        model = MODELS[name]()
        d = tmp_path / name
        export_hf(model, str(d), tokenizer=None, context_length=128)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == want_type, name
        assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_molm.")
        assert cfg["n_positions"] == 128 and cfg["tie_word_embeddings"] is False
        back = config_from_hf(cfg)
        assert MoLM(back).config.total_params == model.config.total_params
        assert [back.att_experts_at(i) for i in range(back.n_layer)] == \
            [model.config.att_experts_at(i) for i in range(model.config.n_layer)]
    uniform = json.loads((tmp_path / "pruned-uniform" / "config.json").read_text())
    # the real counts, and k capped at them, so the released code builds the pruned layers
    assert (uniform["n_att_experts"], uniform["k_att"], uniform["n_mlp_experts"], uniform["k_mlp"]) == (2, 2, 1, 1)
    assert "n_att_experts_per_layer" not in uniform
    per_layer = json.loads((tmp_path / "pruned-per-layer" / "config.json").read_text())
    assert per_layer["n_att_experts_per_layer"] == [4, 1] and per_layer["n_mlp_experts_per_layer"] == [3, 2]


def test_special_ids_generation_config_and_tokenizer(tmp_path, run_tokenizer):
    from transformers import AutoTokenizer, GenerationConfig

    from molm_ds.hf import export_hf

    model = MODELS["preset-tiny"]()
    export_hf(model, str(tmp_path / "hf"), tokenizer=run_tokenizer, context_length=64)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2, 3)
    gen = GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (2, 2, 3, False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf = _load(str(tmp_path / "hf"))
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=5)
    assert out.shape[1] <= ids.shape[1] + 5 and isinstance(tok.decode(out[0]), str)
    assert (tmp_path / "hf" / "README.md").read_text().startswith("---")
    # one mode for every file (safetensors alone would write its weights 0600): 0666 less the umask
    mask = os.umask(0)
    os.umask(mask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_bf16_and_sharded_weights(tmp_path):
    from molm_ds.hf import export_hf

    model = MODELS["preset-small"]()
    export_hf(model, str(tmp_path / "hf"), tokenizer=None, context_length=64, dtype="bfloat16", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len({f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()}) == 1  # the shards too
    from molm_ds.interop import load_moduleformer

    again = load_moduleformer(str(tmp_path / "hf"))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), n


def test_refuses_a_non_empty_directory_and_a_wrong_tokenizer(tmp_path, run_tokenizer):
    from molm_ds.errors import ConfigError
    from molm_ds.hf import export_hf

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_hf(MODELS["preset-tiny"](), str(tmp_path / "x"), tokenizer=None, context_length=64)
    small_vocab = perturbed(ModelConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ConfigError, match="512 pieces but the model only 100"):
        export_hf(small_vocab, str(tmp_path / "y"), tokenizer=run_tokenizer, context_length=64)


@pytest.mark.parametrize("scheme", ["fan_in", "released"])
def test_hf_fresh_init_follows_router_init(scheme):
    """The Hugging Face model's own init (from_config) draws the routers as molm-ds does: fan_in B ~ N(0, 1/D),
    A ~ N(0, 1/R); released N(0, initializer_range). The export carries the choice."""
    from molm_ds.hf.configuration_molm import MoLMConfig
    from molm_ds.hf.modeling_molm import MoLMForCausalLM
    from molm_ds.interop import config_from_hf, hf_config

    cfg = ModelConfig.from_preset("tiny", d_model=256, att_hidden=256, gating_size=256, router_init=scheme)
    hf = hf_config(cfg)
    assert hf["router_init"] == scheme and config_from_hf(hf).router_init == scheme
    torch.manual_seed(0)
    model = MoLMForCausalLM(MoLMConfig(**{k: v for k, v in hf.items() if not k.startswith("_")}))
    gate = model.transformer.h[0].mlpf.gate.w_gate
    b, a = gate[0].weight, gate[3].weight
    want_b, want_a = (256 ** -0.5, 256 ** -0.5) if scheme == "fan_in" else (0.02, 0.02)
    assert abs(float(b.std()) / want_b - 1) < 0.1 and abs(float(a.std()) / want_a - 1) < 0.2
    assert float(gate[0].bias.abs().max()) == 0.0
