"""Autoregressive decoding with per-mixer decoding states (KV caches, recurrent states).

Prefill runs the prompt through the model once, filling each layer's state; every later step feeds
one token per sequence. Sampling: greedy at ``temperature=0``, else temperature, then top-k, then
nucleus (top-p; Holtzman et al. 2020, §3.1) filtering.
"""

from __future__ import annotations

import torch


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``(B, T + n)`` ids, ``n <= max_new_tokens``; sequences that emitted ``eos_token_id``
    are padded with it until every sequence has (then decoding stops early)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, T = input_ids.shape
    states = model.init_states(B, T + max_new_tokens)
    logits = model(input_ids, states=states).logits[:, -1]
    tokens = [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens.append(next_token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        logits = model(next_token[:, None], states=states).logits[:, -1]
    return torch.cat(tokens, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits (B, V)``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
