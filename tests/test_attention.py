"""Attention, rotary embedding and RMSNorm against plain float64 references."""

import math

import pytest
import torch

from zoo.blocks.attention import Attention, AttentionConfig, attend
from zoo.blocks.norm import RMSNorm
from zoo.blocks.rope import RotaryEmbedding
from zoo.model import init_weights
from zoo.registry import BlockContext

CTX = BlockContext(d_model=64, n_layers=2, layer_idx=0, max_seq_len=64, init_std=0.02)


def reference_attention(q, k, v, offset):
    """Loops over heads and positions; float64 softmax; GQA by explicit head mapping."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        for t in range(T):
            keys = k[:, h // groups, : offset + t + 1].double()
            scores = (keys @ q[:, h, t].double()[:, :, None])[..., 0] / math.sqrt(D)
            out[:, h, t] = (scores.softmax(-1)[:, None, :] @ v[:, h // groups, : offset + t + 1].double())[:, 0]
    return out


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_backends_match_reference(backend, heads, offset):
    H, Hkv = heads
    q = torch.randn(2, H, 7, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, Hkv, 7 + offset, 16, dtype=torch.float64).unbind(0)
    expected = reference_attention(q, k, v, offset)
    torch.testing.assert_close(attend(q, k, v, offset, backend), expected, rtol=0, atol=1e-10)
    got32 = attend(q.float(), k.float(), v.float(), offset, backend)
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_xformers_matches_eager_on_cuda():
    pytest.importorskip("xformers")
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    expected = attend(q.float(), k.float(), v.float(), 0, "eager")
    torch.testing.assert_close(attend(q, k, v, 0, "xformers").float(), expected, rtol=0, atol=2e-3)


def test_gqa_equals_mha_with_repeated_kv():
    gqa = init_weights(Attention(AttentionConfig(n_heads=4, n_kv_heads=2), CTX)).double()
    mha = init_weights(Attention(AttentionConfig(n_heads=4, n_kv_heads=4), CTX)).double()
    q_w, k_w, v_w = gqa.qkv.weight.split([64, 32, 32])
    repeat = lambda w: w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        mha.out.weight.copy_(gqa.out.weight)
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_prefill_then_steps_equals_full_forward(n_kv_heads):
    attn = init_weights(Attention(AttentionConfig(n_heads=4, n_kv_heads=n_kv_heads), CTX)).double()
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    state = attn.init_state(2, 12, x.device, x.dtype)
    pieces = [attn(x[:, :5], state), attn(x[:, 5:9], state)] + [attn(x[:, t:t + 1], state) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), attn(x), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="KV cache full"):
        attn(x[:, :1], state)


def test_rope_rotates_pairs_and_depends_on_relative_position():
    rope = RotaryEmbedding(8, theta=100.0)
    x = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    got = rope(x, offset=3)
    # Reference: complex rotation of (x_i, x_{i+4}) by (3 + t) * theta^(-2i/8).
    z = torch.complex(x[..., :4], x[..., 4:])
    angle = torch.arange(3, 9, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(got, torch.cat([rotated.real, rotated.imag], -1), rtol=0, atol=1e-12)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64).unbind(0)
    dots = [(rope(q, m) * rope(k, m - 2)).sum().item() for m in (2, 7, 40)]
    assert max(dots) - min(dots) < 1e-12


def test_rope_tables_survive_casting_the_model_to_bfloat16():
    attn = init_weights(Attention(AttentionConfig(n_heads=4), CTX)).to(torch.bfloat16)
    x = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(attn.rope(x, 1000).float(), RotaryEmbedding(16)(x, 1000).float(), rtol=0, atol=1e-6)


def test_rmsnorm_matches_float64_reference():
    norm = RMSNorm(32, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    bf16 = norm.float()(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), expected, rtol=2e-2, atol=2e-2)
