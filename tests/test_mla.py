"""Multi-head Latent Attention: against a float64 transcription of DeepSeek-V2 Eq. 9-19, the absorbed
decoding path against the expanded one, and the size of its compact cache."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.blocks.mla import MLAConfig, MultiHeadLatentAttention
from zoo.model import init_weights
from zoo.registry import BlockContext

CTX = BlockContext(d_model=48, n_layers=2, layer_idx=0, max_seq_len=64, init_std=0.1)


def mla(q_lora_rank, norm_eps=1e-6):
    config = MLAConfig(n_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8,
                       qk_rope_head_dim=6, v_head_dim=10, norm_eps=norm_eps)
    module = init_weights(MultiHeadLatentAttention(config, CTX)).double()
    for norm in (getattr(module, "q_norm", None), module.kv_norm):
        if norm is not None:
            norm.weight.data.uniform_(0.5, 1.5)
    return module


def rope(x, positions, theta=10000.0):
    """Rotate pairs (i, i + d/2) by pos * theta^(-2i/d) (Su et al. 2021, Eq. 34, half layout)."""
    d = x.shape[-1]
    angles = positions[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()), dim=-1)


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference(m: MultiHeadLatentAttention, h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DeepSeek-V2 §2.1, token by token and head by head, in float64; ``eps`` of the latent RMSNorms."""
    T = h.shape[1]
    H, dn, dr, dv, r = m.n_heads, m.nope, m.rope_dim, m.v_dim, m.kv_lora_rank
    pos = torch.arange(T, dtype=torch.float64)
    if hasattr(m, "q_proj"):
        q = h @ m.q_proj.weight.T
    else:
        c_q = rms(h @ m.q_down.weight.T, m.q_norm.weight, eps)  # Eq. 12
        q = c_q @ m.q_up.weight.T
    q = q.view(*h.shape[:2], H, dn + dr)
    q_c, q_r = q[..., :dn], rope(q[..., dn:].transpose(1, 2), pos).transpose(1, 2)  # Eq. 13-14
    down = h @ m.kv_down.weight.T
    c_kv = rms(down[..., :r], m.kv_norm.weight, eps)  # Eq. 9
    k_r = rope(down[..., r:], pos)  # Eq. 15
    up = (c_kv @ m.kv_up.weight.T).view(*h.shape[:2], H, dn + dv)
    k_c, v = up[..., :dn], up[..., dn:]  # Eq. 10-11
    out = torch.zeros(*h.shape[:2], H, dv, dtype=torch.float64)
    for t in range(T):
        for i in range(H):
            qi = torch.cat((q_c[:, t, i], q_r[:, t, i]), -1)  # Eq. 16
            ki = torch.cat((k_c[:, : t + 1, i], k_r[:, : t + 1]), -1)  # Eq. 17
            w = torch.softmax((ki @ qi[:, :, None])[..., 0] / math.sqrt(dn + dr), dim=-1)
            out[:, t, i] = (w[:, :, None] * v[:, : t + 1, i]).sum(1)  # Eq. 18
    return out.flatten(2) @ m.out.weight.T  # Eq. 19


@pytest.mark.parametrize("q_lora_rank", [None, 16])
@pytest.mark.parametrize("norm_eps", [1e-6, 0.5])  # 0.5: the latent norms' own eps, visibly far from 1e-6
def test_matches_float64_reference(q_lora_rank, norm_eps):
    m = mla(q_lora_rank, norm_eps)
    h = torch.randn(2, 9, CTX.d_model, dtype=torch.float64)
    torch.testing.assert_close(m(h), reference(m, h, norm_eps), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_absorbed_decoding_equals_full_forward(q_lora_rank):
    m = mla(q_lora_rank).float()
    h = torch.randn(2, 11, CTX.d_model)
    full = m(h)
    state = m.init_state(2, 11, h.device, h.dtype)
    steps = [m(h[:, :4], state)] + [m(h[:, t:t + 1], state) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_the_latent_and_rope_key():
    m = mla(16)
    state = m.init_state(1, 100, "cpu", torch.float64)
    per_token = (state.latent.numel() + state.k_rope.numel()) // 100
    assert per_token == m.kv_lora_rank + m.rope_dim == 18  # full K/V would be 2 * 3 heads * 10+ dims
    state.length = 100
    with pytest.raises(RuntimeError, match="MLA cache full"):
        m(torch.randn(1, 1, CTX.d_model, dtype=torch.float64), state)


def test_causal():
    m = mla(None)
    h = torch.randn(1, 10, CTX.d_model, dtype=torch.float64)
    changed = h.clone()
    changed[:, 6:] = torch.randn(1, 4, CTX.d_model, dtype=torch.float64)
    torch.testing.assert_close(m(h)[:, :6], m(changed)[:, :6], rtol=0, atol=0)
    assert not torch.allclose(m(h)[:, 6:], m(changed)[:, 6:])
