"""The same export loads in IBM's reference ModuleFormer code when it can build the model: logits agree
with molm-ds (relative 3e-6) and greedy generation is token-identical, for the released shapes and a
uniformly pruned model (its real expert counts). IBM's code is not on PyPI and needs transformers < 5
(it imports transformers.onnx): point MOLM_DS_IBM_MODULEFORMER at a checkout of
github.com/IBM/ModuleFormer (the directory holding moduleformer/) to run these; skipped otherwise."""

from __future__ import annotations

import os
import sys

import pytest
import torch

IBM = os.environ.get("MOLM_DS_IBM_MODULEFORMER")
pytestmark = pytest.mark.skipif(not IBM or not os.path.isdir(os.path.join(IBM or "", "moduleformer")),
                                reason="MOLM_DS_IBM_MODULEFORMER (a checkout of IBM/ModuleFormer) is not set")


@pytest.fixture(scope="module")
def ibm_auto():
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"IBM's ModuleFormer code needs transformers < 5 (have {transformers.__version__})")
    import importlib.util

    pkg = os.path.join(IBM, "moduleformer")  # the checkout's package, imported by path (sys.path untouched)
    spec = importlib.util.spec_from_file_location("moduleformer", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    module = importlib.util.module_from_spec(spec)
    sys.modules["moduleformer"] = module
    spec.loader.exec_module(module)
    ModuleFormerConfig, ModuleFormerForCausalLM = module.ModuleFormerConfig, module.ModuleFormerForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("moduleformer", ModuleFormerConfig, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
    return AutoModelForCausalLM, ModuleFormerForCausalLM


@pytest.mark.parametrize("name", ["preset-molm-350m-4b", "preset-molm-700m-4b", "preset-molm-700m-8b",
                                  "released_multihead", "pruned-uniform"])
def test_ibm_code_agrees(name, tmp_path, ibm_auto):
    from molm_ds.hf import export_hf
    from molm_ds.testing import EXPORT_MODELS as MODELS

    auto, ibm_class = ibm_auto
    model = MODELS[name]()
    assert export_hf(model, str(tmp_path / "hf"), tokenizer=None, context_length=64)["ibm_compatible"]
    ibm = auto.from_pretrained(str(tmp_path / "hf")).eval()  # no trust_remote_code: the registered IBM class
    assert type(ibm) is ibm_class
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(ids).logits, ibm(ids).logits
        assert float((got - want).abs().max() / want.abs().max()) < 3e-6
        assert torch.equal(ibm.generate(ids[:, :5], max_new_tokens=8, do_sample=False), model.generate(ids[:, :5], 8))


def test_ibm_code_is_not_picked_for_a_model_it_cannot_build(tmp_path, ibm_auto):
    from molm_ds.hf import export_hf
    from molm_ds.testing import EXPORT_MODELS as MODELS

    auto, _ = ibm_auto
    info = export_hf(MODELS["preset-tiny"](), str(tmp_path / "hf"), tokenizer=None, context_length=64)
    assert info["model_type"] == "molm" and not info["ibm_compatible"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        auto.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
