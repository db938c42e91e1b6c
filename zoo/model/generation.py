"""Autoregressive decoding with per-mixer decoding states (:class:`zoo.blocks.state.DecodingState`:
KV caches, recurrent states), which every forward pass advances in place.

Prefill runs the prompt through the model once, filling each layer's state; every later step feeds
one token per sequence. Prompts of different lengths decode as one batch when left-padded with an
``attention_mask``: the states learn each row's padding and every mixer keeps pads out. Logits go
through the CTRL repetition penalty (Keskar et al. 2019, §4.1) when one is set; sampling is greedy at
``temperature=0``, else temperature, then top-k, then nucleus (top-p; Holtzman et al. 2020, §3.1)
filtering. Self-speculative decoding with the MTP modules is in :mod:`zoo.model.speculative`.

Decoding runs the model in evaluation mode (each module's own mode is restored afterwards): a model fresh
from ``create_model`` is in training mode, where Switch layers drop tokens over expert capacity (the
prefill would then not be causal), routers add jitter noise and count expert loads for the next
loss-free bias update, and MoE layers compute balancing losses.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model):
    """Put every module of ``model`` in eval mode for the ``with`` block, then restore each one's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def left_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The ``(B,)`` count of leading pad positions of each row of a left-padded ``attention_mask (B, T)``
    (1 at real tokens); None when no row is padded. Raises ValueError unless every row is zeros then ones
    with at least one real token."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    real = attention_mask.to(torch.bool)
    pad = (~real).long().cumprod(dim=1).sum(dim=1)  # leading zeros per row
    if not bool(real.sum(dim=1).eq(real.shape[1] - pad).all()) or bool(pad.eq(real.shape[1]).any()):
        raise ValueError("attention_mask must be left padding: each row zeros (pads) then ones, with at "
                         "least one real token (pad on the left to batch prompts of different lengths)")
    return pad if bool(pad.any()) else None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al. 2019, §4.1), as transformers applies it: the logit of
    every token already in the row (``seen (B, V)`` True) is divided by ``penalty`` when positive and
    multiplied by it when negative, so ``penalty > 1`` makes repeats less likely. ``logits (B, V)``."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def decode_steps(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, repetition_penalty: float | None = None):
    """Yield the next token of every row, ``(B,)``, up to ``max_new_tokens`` times; the caller stops when it
    has what it needs (end of text, stop strings). ``attention_mask (B, T)`` marks left padding (0 at pads):
    every mixer keeps the pads out (see :class:`zoo.blocks.state.DecodingState`), so each row decodes as
    it would alone. ``repetition_penalty`` (> 0; None or 1: off) is applied to the logits before
    sampling, over each row's real prompt tokens and the tokens generated so far."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 or None: off), got {repetition_penalty!r}")
    pad = left_padding(attention_mask, input_ids)
    B, T = input_ids.shape
    seen = None
    if repetition_penalty not in (None, 1.0):
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=input_ids.device)
        seen[torch.arange(B, device=input_ids.device)[:, None].expand(B, T)[real], input_ids[real]] = True
    if max_new_tokens == 0:
        return
    with eval_mode(model), torch.no_grad():
        states = model.init_states(B, T + max_new_tokens, left_pad=pad)
        logits = model(input_ids, states=states).logits[:, -1]
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            yield next_token
            if step + 1 == max_new_tokens:
                return
            if seen is not None:
                seen[torch.arange(B, device=seen.device), next_token] = True
            logits = model(next_token[:, None], states=states).logits[:, -1]


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
             repetition_penalty: float | None = None) -> torch.Tensor:
    """Return ``(B, T + n)`` ids, ``n <= max_new_tokens``; sequences that emitted ``eos_token_id``
    are padded with it until every sequence has (then decoding stops early). Options as in
    :func:`decode_steps`."""
    tokens = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    steps = decode_steps(model, input_ids, max_new_tokens, temperature, top_k, top_p, generator, attention_mask,
                         repetition_penalty)
    for next_token in steps:
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens.append(next_token[:, None])
        if eos_token_id is not None and bool(finished.all()):
            steps.close()
            break
    return torch.cat(tokens, dim=1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits (B, V)``: the argmax at ``temperature=0``, else a draw from
    :func:`sampling_probs`."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """``(..., V)`` float32: the softmax of ``logits / temperature`` (``temperature > 0``) restricted to the
    ``top_k`` largest logits and then to the smallest set of tokens whose probability reaches ``top_p``."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming a bad sampling option."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (no top-k filtering), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None (no nucleus filtering), got {top_p!r}")
