"""Autoregressive decoding with per-mixer decoding states (:class:`zoo.blocks.state.DecodingState`:
KV caches, recurrent states), which every forward pass advances in place.

Prefill runs the prompt through the model once, filling each layer's state; every later step feeds
one token per sequence. Sampling: greedy at ``temperature=0``, else temperature, then top-k, then
nucleus (top-p; Holtzman et al. 2020, §3.1) filtering.

:func:`generate_speculative` is greedy self-speculative decoding with a model's multi-token prediction
modules as drafters (DeepSeek-V3, arXiv 2412.19437 §5.4.3; draft-then-verify as in Leviathan et al.
2023, §2.3, at temperature 0): the MTP modules draft ``D`` tokens, the main model scores the last
committed token and the drafts in one forward pass, the longest prefix of drafts that matches the main
model's argmax is kept, and the main model's own next token follows it, so the output is plain greedy
decoding's token for token (in exact arithmetic; a batched verification pass rounds differently from
one-token steps, which can only matter for near-ties in low precision).

Both run the model in evaluation mode (each module's own mode is restored afterwards): a model fresh
from ``create_model`` is in training mode, where Switch layers drop tokens over expert capacity (the
prefill would then not be causal), routers add jitter noise and count expert loads for the next
loss-free bias update, and MoE layers compute balancing losses.
"""

from __future__ import annotations

import functools

import torch

from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.state import DecodingState


def _in_eval_mode(decode):
    """Run ``decode(model, ...)`` with every module of ``model`` in eval mode, then restore each one's mode."""

    @functools.wraps(decode)
    def wrapper(model, *args, **kwargs):
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            return decode(model, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    return wrapper


def _discarding_aux() -> AuxCollector:
    """A closed collector: it keeps nothing (decoding makes many passes and needs no losses or counts)."""
    aux = AuxCollector()
    aux.close()
    return aux


@_in_eval_mode
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``(B, T + n)`` ids, ``n <= max_new_tokens``; sequences that emitted ``eos_token_id``
    are padded with it until every sequence has (then decoding stops early)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
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
    """One token per row of ``logits (B, V)``: the argmax at ``temperature=0``, else a draw from the
    softmax of ``logits / temperature`` restricted to the ``top_k`` largest logits and then to the
    smallest set of tokens whose probability reaches ``top_p``."""
    _check_sampling(temperature, top_k, top_p)
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


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (no top-k filtering), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None (no nucleus filtering), got {top_p!r}")


@_in_eval_mode
def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int = 64,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy decoding of ``input_ids (1, T)`` drafted by ``model.mtp`` and verified by the main model.

    Returns ``(ids (1, T + n), stats)``, ``n <= max_new_tokens``, the ids being exactly plain greedy
    :func:`generate`'s; ``stats``: ``drafted`` and ``accepted`` draft tokens, ``acceptance_rate``
    (accepted / drafted), ``forward_passes`` (main-model passes that emit tokens: the prefill and each
    verification; plain decoding needs one per token), ``rollback_passes`` (extra passes re-feeding
    accepted tokens into states that cannot rewind, e.g. retention's), ``tokens_per_pass``.

    Bookkeeping, with ``N`` committed tokens ``x_0..x_{N-1}``: the main model has processed ``x_0..x_{N-2}``
    and its pre-norm hidden states ``h^0_i`` are kept; depth ``k`` of the MTP chain at position ``i``
    reads ``h^{k-1}_i`` and token ``x_{i+k}`` and predicts ``x_{i+k+1}`` (so draft ``d_k`` of ``x_{N-1+k}``
    comes from position ``N-2``). Positions of depth ``k`` up to ``N-1-k`` read committed tokens only and
    stay in its decoding state; the later ``k-1`` read drafts and are discarded after verification by
    restoring the snapshot taken before them. Rejected positions of the main model are rewound when every
    main state ``can_rewind`` (KV caches); otherwise every state is restored to its snapshot from before
    verification and fed the accepted tokens again (recurrent states, alone or in a hybrid).
    """
    mtp = model.mtp
    if mtp is None:
        raise ValueError("speculative='mtp' needs multi-token prediction modules: this model has none "
                         "(its config has no model.mtp, or drop_mtp() removed them)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative='mtp' decodes one sequence at a time (batch 1), got batch {input_ids.shape[0]}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stats = {"drafted": 0, "accepted": 0, "forward_passes": 0, "rollback_passes": 0}
    T, D = input_ids.shape[1], mtp.depth
    capacity = T + max_new_tokens + D + 1
    seq = input_ids.new_zeros(1, capacity)  # committed tokens, then this step's drafts
    seq[:, :T] = input_ids
    aux = _discarding_aux()
    main_states = model.init_states(1, capacity)
    mtp_states = model.init_states(1, capacity, [module.block for module in mtp.layers])
    done = [0] * (D + 1)  # done[k]: positions held in depth k's state (k >= 1)
    n_new = 0
    if max_new_tokens > 0:
        h = model.hidden_states(input_ids, aux, main_states)  # (1, T, d)
        hidden = [h.new_zeros(1, capacity, h.shape[-1]) for _ in range(D + 1)]  # h^k_i by position i
        hidden[0][:, :T] = h
        seq[:, T] = model.head(model.norm(h[:, -1])).argmax(-1)
        stats["forward_passes"] += 1
        n_new = 1
    N = T + n_new
    while n_new < max_new_tokens and not (eos_token_id is not None and int(seq[0, N - 1]) == eos_token_id):
        n_draft = min(D, max_new_tokens - n_new - 1)
        marks = [_draft(model, k, N, seq, hidden, mtp_states[k - 1], done, aux) for k in range(1, n_draft + 1)]
        # Verify x_{N-1}, d_1..d_n at positions N-1..N-1+n in one pass.
        main_marks = [state.snapshot() for state in main_states]
        h = model.hidden_states(seq[:, N - 1:N + n_draft], aux, main_states)  # (1, n+1, d)
        predicted = model.head(model.norm(h)).argmax(-1)[0]  # (n+1,): x_N .. x_{N+n} by the main model
        stats["forward_passes"] += 1
        matches = (predicted[:n_draft] == seq[0, N:N + n_draft]).long()
        accepted = int(matches.cumprod(0).sum())
        seq[:, N + accepted] = predicted[accepted]
        hidden[0][:, N - 1:N + accepted] = h[:, :accepted + 1]
        if accepted < n_draft:
            if all(state.can_rewind for state in main_states):
                for state in main_states:
                    state.rewind(n_draft - accepted)
            else:  # restore, then feed the accepted tokens again
                for state, mark in zip(main_states, main_marks):
                    state.restore(mark)
                hidden[0][:, N - 1:N + accepted] = model.hidden_states(seq[:, N - 1:N + accepted], aux, main_states)
                stats["rollback_passes"] += 1
        for k, mark in enumerate(marks, start=1):
            mtp_states[k - 1].restore(mark)
        stats["drafted"] += n_draft
        stats["accepted"] += accepted
        emitted = accepted + 1
        if eos_token_id is not None:
            eos = (seq[0, N:N + emitted] == eos_token_id).nonzero()
            emitted = int(eos[0]) + 1 if len(eos) else emitted
        N += emitted
        n_new += emitted
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    stats["tokens_per_pass"] = n_new / stats["forward_passes"] if stats["forward_passes"] else 0.0
    return seq[:, :N].clone(), stats


def _draft(model, k: int, N: int, seq: torch.Tensor, hidden: list, state: DecodingState, done: list, aux):
    """Advance MTP depth ``k`` to position ``N-2`` and write its draft of ``x_{N-1+k}`` into ``seq``.

    Positions up to ``N-1-k`` (all, for parallel heads) read committed tokens and are kept; later ones
    read drafts. Returns the state's snapshot taken between the two, to restore after verification."""
    mtp = model.mtp
    last = N - 2
    certain = last if not mtp.sequential else min(last, N - 1 - k)
    mark = None
    for start, end in ((done[k], certain), (max(done[k], certain + 1), last)):
        if end >= start:
            trunk = hidden[k - 1] if mtp.sequential else hidden[0]
            hidden[k][:, start:end + 1] = mtp.step(k, trunk[:, start:end + 1], seq[:, start + k:end + k + 1],
                                                   model.embed, aux, state)
        if mark is None:
            done[k] = max(done[k], certain + 1)
            mark = state.snapshot()
    seq[:, N - 1 + k] = model.head(mtp.layers[k - 1].norm(hidden[k][:, last])).argmax(-1)
    return mark
