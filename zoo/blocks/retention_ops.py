"""Retention maths in its three forms plus a naive reference (Sun et al. 2023, arXiv 2307.08621, §2.1).

All functions take ``q, k: (B, H, T, Dk)``, ``v: (B, H, T, Dv)`` (rotary positions already applied,
``k`` already scaled) and ``log_gamma: (H,)``, the log of each head's decay, and compute

    o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m                         (Eq. 5, with D applied)

* :func:`parallel_retention` — Eq. 5: ``(Q K^T ⊙ D) V`` with ``D[n, m] = gamma^(n - m)`` for ``n >= m``.
* :func:`recurrent_retention` — Eq. 6: ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``.
* :func:`chunkwise_retention` — Eq. 7 with the paper's index erratum fixed: chunk ``i`` reads the
  state left by chunk ``i - 1`` (the paper writes ``R_i`` where ``R_{i-1}`` is meant), decayed by
  ``gamma^(j + 1)`` at in-chunk position ``j``; the state then advances as
  ``R_i = gamma^C R_{i-1} + K_i^T (V_i ⊙ gamma^(C - 1 - j))``. A trailing partial chunk is processed
  as a chunk of its own length, so any ``T`` works and the returned state is exact.
* :func:`naive_retention` — the definition above evaluated token by token with ``gamma ** (n - m)``;
  the ground truth the tests compare every form against in float64.

Decay masks are built, and the recurrent state is kept and updated, in float32 (float64 for float64
inputs) with autocast disabled, whatever the input dtype: a bf16 state drifts by ~12% within 512
tokens. Matmuls that do not touch the state (``Q K^T`` and the in-chunk product) follow autocast.
``recurrent_retention`` and ``chunkwise_retention`` take the state ``(B, H, Dk, Dv)`` before the
first token (``None``: zeros) and return ``(o, state after the last token)``; they never write into
the state they are given.
"""

from __future__ import annotations

import torch
from einops import rearrange


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the decay masks and recurrent state use for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def decay_mask(log_gamma: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """``D: (H, length, length)`` with ``D[h, n, m] = gamma_h^(n - m)`` for ``n >= m``, else 0."""
    pos = torch.arange(length, device=log_gamma.device, dtype=dtype)
    distance = pos[:, None] - pos[None, :]  # (T, T)
    causal = distance >= 0
    decay = torch.exp(log_gamma.to(dtype)[:, None, None] * distance.clamp(min=0))
    return decay * causal


def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``(Q K^T ⊙ D) V`` from a zero state; returns ``(B, H, T, Dv)``."""
    D = decay_mask(log_gamma, q.shape[2], state_dtype(q.dtype))  # (H, T, T)
    scores = (q @ k.transpose(-1, -2)) * D  # (B, H, T, T), float32
    return scores.to(v.dtype) @ v


def recurrent_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 one token at a time; returns ``o: (B, H, T, Dv)`` (state dtype) and the new state."""
    sdt = state_dtype(q.dtype)
    state = _zero_state(q, v, sdt) if state is None else state
    gamma = torch.exp(log_gamma.to(sdt))[:, None, None]  # (H, 1, 1)
    outputs = []
    with torch.autocast(q.device.type, enabled=False):
        for q_t, k_t, v_t in zip(q.to(sdt).unbind(2), k.to(sdt).unbind(2), v.to(sdt).unbind(2)):
            state = gamma * state + k_t[..., :, None] * v_t[..., None, :]  # (B, H, Dk, Dv)
            outputs.append((q_t[..., None, :] @ state).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outputs, dim=2), state


def chunkwise_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        chunk_size: int, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 (erratum fixed) over chunks of ``chunk_size``; returns ``o: (B, H, T, Dv)`` and the new state.

    ``chunk_size >= T`` is the parallel form started from ``state``.
    """
    sdt = state_dtype(q.dtype)
    state = _zero_state(q, v, sdt) if state is None else state
    T = q.shape[2]
    full = T - T % chunk_size
    outputs = []
    for start, stop, size in ((0, full, chunk_size), (full, T, T - full)):
        if stop > start:
            o, state = _equal_chunks(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                     log_gamma, size, state)
            outputs.append(o)
    return torch.cat(outputs, dim=2), state


def _equal_chunks(q, k, v, log_gamma, C, state):
    """Chunkwise retention over ``T = N * C`` positions (N chunks of length C)."""
    sdt = state.dtype
    q, k, v = (rearrange(x, "b h (n c) d -> b h n c d", c=C) for x in (q, k, v))
    log_gamma = log_gamma.to(sdt)
    pos = torch.arange(C, device=q.device, dtype=sdt)
    inner_decay = decay_mask(log_gamma, C, sdt)[:, None]  # (H, 1, C, C)
    inner = ((q @ k.transpose(-1, -2)) * inner_decay).to(v.dtype) @ v  # (B, H, N, C, Dv)
    read_decay = torch.exp(log_gamma[:, None] * (pos + 1))[:, None, :, None]  # (H, 1, C, 1): gamma^(j+1)
    write_decay = torch.exp(log_gamma[:, None] * (C - 1 - pos))[:, None, :, None]  # gamma^(C-1-j)
    chunk_decay = torch.exp(log_gamma * C)[:, None, None]  # (H, 1, 1)
    with torch.autocast(q.device.type, enabled=False):
        writes = (k.to(sdt) * write_decay).transpose(-1, -2) @ v.to(sdt)  # (B, H, N, Dk, Dv)
        before = []  # the state each chunk reads: the one left by the previous chunk
        for write in writes.unbind(2):  # unbind, not writes[:, :, i]: indexing makes backward quadratic
            before.append(state)
            state = chunk_decay * state + write
        cross = (q.to(sdt) * read_decay) @ torch.stack(before, dim=2)  # (B, H, N, C, Dv)
    return rearrange(inner + cross, "b h n c d -> b h (n c) d"), state


def naive_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                    state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, token by token, in the inputs' dtype (use float64): ``(o, final state)``.

    ``o_n = q_n (gamma^(n+1) S_0) + sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m``.
    """
    B, H, T, _ = q.shape
    gamma = torch.exp(log_gamma.to(q.dtype))[None, :, None]  # (1, H, 1)
    m = torch.arange(T, device=q.device, dtype=q.dtype)
    outputs = []
    for n in range(T):
        weights = (q[:, :, n, None, :] * k[:, :, :n + 1]).sum(-1) * gamma ** (n - m[:n + 1])  # (B, H, n+1)
        o = (weights[..., None] * v[:, :, :n + 1]).sum(2)
        if state is not None:
            o = o + gamma ** (n + 1) * (q[:, :, n, :, None] * state).sum(-2)
        outputs.append(o)
    final = ((gamma ** (T - 1 - m))[..., None, None] * k[..., :, None] * v[..., None, :]).sum(2)
    if state is not None:
        final = final + gamma[..., None] ** T * state
    return torch.stack(outputs, dim=2), final


def _zero_state(q, v, dtype):
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=dtype)
