"""Autoregressive generation with the KV cache: greedy, or sampling with temperature, top-k and top-p.

Batches of prompts of different lengths must be LEFT-padded, with `attention_mask` [B, T] marking the
real tokens, so that every row's next token is appended at the same column.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.no_grad()
def generate(
    model,
    input_ids_BT: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Returns [B, T + max_new_tokens] (rows that produced `eos_token_id` are then padded with it).
    Sampling keeps the `top_k` most likely tokens, then the smallest set whose probability reaches `top_p`
    (nucleus; the most likely token always stays), and samples from the renormalised rest."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy); got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs LEFT padding: the last column of attention_mask must be all ones")
    was_training = model.training
    model.eval()
    B = input_ids_BT.shape[0]
    mask = attention_mask.long() if attention_mask is not None else None
    out = model(input_ids_BT, attention_mask=mask, use_cache=True)
    tokens = [input_ids_BT]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids_BT.device)
    for step in range(max_new_tokens):
        logits_BV = out.logits[:, -1, :].float()
        if do_sample:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
            if top_p is not None and top_p < 1.0:
                logits_BV = top_p_filter(logits_BV, top_p)
            nxt = torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=generator)
        else:
            nxt = logits_BV.argmax(-1, keepdim=True)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_token_id)
            done |= nxt[:, 0] == eos_token_id
        tokens.append(nxt)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    model.train(was_training)
    result = torch.cat(tokens, dim=1)
    want = input_ids_BT.shape[1] + max_new_tokens
    if result.shape[1] < want:  # stopped early at EOS everywhere
        result = torch.cat([result, result.new_full((B, want - result.shape[1]), eos_token_id)], dim=1)
    return result


def top_p_filter(logits_BV: Tensor, top_p: float) -> Tensor:
    """-inf outside the nucleus: tokens after the most likely ones whose probabilities first reach top_p."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_BV, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= top_p  # the first token has before = 0 < top_p: always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order_BV, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))
