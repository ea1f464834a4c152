"""Rank workers for test_ep_checkpoint.py: save at one ep_size, load at another (importable by spawn)."""

from __future__ import annotations

import os

import torch

from tests.parallel._ep_model_workers import MICRO_B, batches, fresh_model, loss_fn, tiny_config

TAG = "step1"


def _engine(model, stage: int, lr: float):
    import deepspeed

    from molm_ds.parallel import build_param_groups

    opt = torch.optim.SGD(build_param_groups(model), lr=lr)
    cfg = {"train_micro_batch_size_per_gpu": MICRO_B, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _local_state(model, info):
    """name -> (tensor, first global expert or None) for every parameter."""
    firsts = {}
    for layer in info.layers:
        for pn, _ in model.get_submodule(layer.name).experts.named_parameters():
            firsts[f"{layer.name}.experts.{pn}"] = layer.first_expert
    return {n: (p.detach().clone(), firsts.get(n)) for n, p in model.named_parameters()}


def save_worker(rank: int, world: int, save_dir: str, stage: int):
    """ep_size = world: train one step, save, check the files by global id, reload (full resume)."""
    from molm_ds.parallel import parallelize
    from molm_ds.checkpoint import check_expert_files, list_expert_files

    cfg = tiny_config()
    model = fresh_model(cfg)
    info = parallelize(model, world, replicate_attention_experts=False)
    engine = _engine(model, stage, lr=0.1)
    ids = batches(world, cfg.vocab_size)[rank]
    engine.backward(loss_fn(engine(ids), ids))
    engine.step()
    engine.save_checkpoint(save_dir, tag=TAG, client_state={"note": "ep-test"})
    torch.distributed.barrier()
    saved = _local_state(model, info)
    check_expert_files(save_dir, TAG, info)
    files = {k: torch.load(v, map_location="cpu", weights_only=False) for k, v in list_expert_files(save_dir, TAG).items()}
    main = torch.load(os.path.join(save_dir, TAG, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    # full resume at the same ep_size (optimizer state too) into a differently initialised model
    torch.manual_seed(99)
    model2 = fresh_model(cfg)
    for p in model2.parameters():
        torch.nn.init.normal_(p, std=0.3)
    info2 = parallelize(model2, world, replicate_attention_experts=False)
    engine2 = _engine(model2, stage, lr=0.1)
    path, client = engine2.load_checkpoint(save_dir, tag=TAG)
    reloaded = _local_state(model2, info2)
    return dict(saved=saved, reloaded=reloaded, client=client, files=files if rank == 0 else None,
                main_keys=sorted(main["module"]) if rank == 0 else None,
                layers=[(l.name, l.kind, l.num_experts, l.ckpt_layer_id) for l in info.layers],
                global_steps=engine2.global_steps)


def load_worker(rank: int, world: int, save_dir: str, stage: int):
    """ep_size = world (may differ from the saver's): load the weights only, then keep training."""
    from molm_ds.parallel import parallelize
    from molm_ds.checkpoint import load_weights

    cfg = tiny_config()
    torch.manual_seed(5)
    model = fresh_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # far from the saved weights
    info = parallelize(model, world, replicate_attention_experts=False)
    engine = _engine(model, stage, lr=0.0)
    load_weights(engine, save_dir, TAG)
    loaded = _local_state(model, info)
    ids = batches(world, cfg.vocab_size)[rank]
    out = engine(ids)
    loss = loss_fn(out, ids)
    engine.backward(loss)
    engine.step()  # lr 0: weights must stay the loaded ones (ZeRO's fp32 master copy refreshed)
    after = _local_state(model, info)
    return dict(loaded=loaded, after=after, logits=out.logits.detach(), loss=loss.detach(), ids=ids)
