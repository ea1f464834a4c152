"""Rank workers for tests/train/test_balance.py (spawned by molm_ds.testing.run_ranks)."""

from __future__ import annotations

import torch


def bias_step_worker(rank: int, world_size: int, state: dict, ids: torch.Tensor, steps: int) -> list:
    """Each rank routes its slice of every step's global batch; returns the biases after ``steps`` updates."""
    from molm_ds.config import ModelConfig
    from molm_ds.model import MoLM
    from molm_ds.train.balance import bias_routers, update_router_biases

    torch.set_num_threads(1)
    model = MoLM(ModelConfig.from_preset("tiny", router_balance="bias", router_bias_rate=0.01))
    model.load_state_dict(state)
    model.train()
    for s in range(steps):
        model(ids[s].chunk(world_size)[rank])
        update_router_biases(model)
    return [r.expert_bias_E.clone() for r in bias_routers(model)]
