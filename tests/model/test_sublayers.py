"""The model publishes its MoE sub-layers: one list, one vocabulary, that the monitor and pruning use."""

import torch

from molm_ds.config import ModelConfig
from molm_ds.model import KINDS, MoLM, SubLayer, moe_sublayers
from molm_ds.monitor import ExpertLoadTracker


def test_one_list_in_block_order_with_one_vocabulary():
    model = MoLM(ModelConfig.from_preset("tiny", n_layer=3, att_experts_per_layer=(4, 2, 3)))
    subs = model.moe_sublayers()
    assert [s.key for s in subs] == [SubLayer(i, k) for i in range(3) for k in ("attn", "mlp")]
    assert KINDS == ("attn", "mlp")
    for s in subs:
        assert model.get_submodule(s.name) is s.module
        assert s.module is (model.blocks[s.layer].attn if s.kind == "attn" else model.blocks[s.layer].mlpf)
        params = dict(model.named_parameters())
        for name in s.stacked_params():
            assert params[name].shape[0] == s.module.num_experts
    assert [s.module.num_experts for s in subs if s.kind == "attn"] == [4, 2, 3]
    assert list(model.moe_layers()) == [s.module for s in subs]


def test_wrappers_publish_the_inner_list():
    model = MoLM(ModelConfig.from_preset("tiny"))

    class Engine(torch.nn.Module):  # holds the model as .module, like DeepSpeed's engine
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert [s.name for s in moe_sublayers(Engine(model))] == [s.name for s in model.moe_sublayers()]
    assert moe_sublayers(torch.nn.Linear(2, 2)) == []


def test_the_monitor_keys_are_the_models_sublayers():
    model = MoLM(ModelConfig.from_preset("tiny"))
    tracker = ExpertLoadTracker(model, hooks=False)
    assert tracker.sublayers == [s.key for s in model.moe_sublayers()]
    assert all(tracker.modules[s.key] is s.module for s in model.moe_sublayers())
