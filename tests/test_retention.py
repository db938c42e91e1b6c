"""Multi-scale retention: the three forms against the naive float64 reference, the mixer's modes and
decoding state, bf16 with a float32 state, and a long chunkwise pass.

Tolerances: float64 forms within 1e-12 of the reference (relative to its largest entry), float32
within 1e-5, bf16 inputs with a float32 state within 2e-2 relative RMS.
"""

import copy
import math

import pytest
import torch

import zoo
from zoo.blocks import retention
from zoo.blocks.retention import (AUTO_PARALLEL_MAX_LEN, MultiScaleRetention, RetentionConfig,
                                   head_log_decays)
from zoo.blocks.retention_ops import chunkwise_retention, naive_retention, parallel_retention, recurrent_retention
from zoo.model import init_weights
from zoo.registry import BlockContext

B, H, DK, DV = 2, 4, 8, 12
LOG_GAMMA = torch.tensor(head_log_decays(H, "loglinear"), dtype=torch.float64)  # gamma up to 1 - 1/512


def rel_max(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def rel_rms(actual, expected):
    return ((actual.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def inputs(T, with_state=True):
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for d in (DK, DK, DV))
    k = k * DK**-0.5
    state = torch.randn(B, H, DK, DV, dtype=torch.float64) if with_state else None
    return q, k, v, state


def outputs_and_grads(fn, q, k, v, state, dtype, seed=1):
    """Run ``fn`` on ``dtype`` copies of the inputs; return (output, final state, dq, dk, dv)."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    s = None if state is None else state.to(dtype)
    o, final = fn(*leaves, s)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
    if final is not None:
        loss = loss + (final * torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (o, final, *grads)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T", [1, 7, 53, 200])
def test_forms_match_naive_reference_outputs_and_grads(T, dtype, tol):
    q, k, v, state = inputs(T)
    naive = lambda q, k, v, s: naive_retention(q, k, v, LOG_GAMMA.to(q.dtype), s)  # noqa: E731
    forms = {"recurrent": lambda q, k, v, s: recurrent_retention(q, k, v, LOG_GAMMA, s)}
    for C in (7, 16, 64):
        forms[f"chunkwise-{C}"] = lambda q, k, v, s, C=C: chunkwise_retention(q, k, v, LOG_GAMMA, C, s)
    for with_state in (True, False):
        s = state if with_state else None
        expected = outputs_and_grads(naive, q, k, v, s, torch.float64)
        for name, fn in forms.items():
            got = outputs_and_grads(fn, q, k, v, s, dtype)
            for what, a, e in zip(("output", "state", "dq", "dk", "dv"), got, expected):
                assert rel_max(a, e) <= tol, (name, with_state, what, rel_max(a, e))
    expected = outputs_and_grads(lambda q, k, v, s: (naive(q, k, v, s)[0], None), q, k, v, None, torch.float64)
    got = outputs_and_grads(lambda q, k, v, s: (parallel_retention(q, k, v, LOG_GAMMA), None), q, k, v, None, dtype)
    for what, i in (("output", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        assert rel_max(got[i], expected[i]) <= tol, ("parallel", what, rel_max(got[i], expected[i]))


def test_bf16_inputs_with_float32_state_stay_close_and_a_bf16_state_drifts():
    T = 512
    q, k, v, _ = inputs(T, with_state=False)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    # float64 chunkwise as the reference here: it matches the naive one to 1e-12 (above) and is fast.
    expected, expected_state = chunkwise_retention(q.double(), k.double(), v.double(), LOG_GAMMA, 512)
    o, state = chunkwise_retention(q, k, v, LOG_GAMMA, 64)
    assert state.dtype == torch.float32
    assert rel_rms(o, expected) <= 2e-2 and rel_rms(state, expected_state) <= 2e-2
    o, state = recurrent_retention(q, k, v, LOG_GAMMA)
    assert rel_rms(o, expected) <= 2e-2 and rel_rms(state, expected_state) <= 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_rms(parallel_retention(q, k, v, LOG_GAMMA), expected) <= 2e-2
    # Why the state is float32: the same recurrence, exact decays, but the state stored in bf16
    # (~2e-2 off after 512 tokens here, against ~1e-6 for the float32 state).
    bf16_state = torch.zeros(B, H, DK, DV, dtype=torch.bfloat16)
    gamma = LOG_GAMMA.exp().float()[:, None, None]
    for k_t, v_t in zip(k.float().unbind(2), v.float().unbind(2)):
        bf16_state = (gamma * bf16_state.float() + k_t[..., :, None] * v_t[..., None, :]).bfloat16()
    assert rel_rms(bf16_state, expected_state) > 100 * rel_rms(state, expected_state)


def mixer(dtype=torch.float64, d_model=32, **options):
    config = RetentionConfig(n_heads=4, **options)
    return init_weights(MultiScaleRetention(config, BlockContext(d_model, 2, 0, 64, 0.2))).to(dtype)


def as_mode(module, mode, chunk_size=None):
    other = copy.deepcopy(module)
    other.mode = mode
    other.chunk_size = chunk_size or other.chunk_size
    return other


@pytest.mark.parametrize("norm", ["groupnorm", "rmsnorm"])
def test_mixer_modes_and_stateful_decoding_agree(norm):
    m = mixer(norm=norm, decay="power2", norm_eps=1e-5)
    torch.nn.init.normal_(m.norm_weight, 1.0, 0.2)
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    full = as_mode(m, "parallel")(x)
    for chunk in (7, 16, 64):
        assert rel_max(as_mode(m, "chunkwise", chunk)(x), full) <= 1e-12
    for mode, chunk in (("chunkwise", 8), ("parallel", None), ("auto", None)):
        decoder = as_mode(m, mode, chunk)
        state = decoder.init_state(2, 45, x.device, x.dtype)
        # prefill 19 (chunkwise over 2 full chunks and a partial one), a 5-token block, then single tokens
        pieces = [decoder(x[:, :19], state), decoder(x[:, 19:24], state)]
        pieces += [decoder(x[:, t:t + 1], state) for t in range(24, 45)]
        assert state.length == 45
        assert rel_max(torch.cat(pieces, dim=1), full) <= 1e-12, mode


@pytest.mark.parametrize("n_heads", [1, 4, 8])
def test_head_decays_follow_their_formulas(n_heads):
    """Eq. 8's ``gamma_h = 1 - 2^(-5-h)`` (power2) and the released LM code's ``1 - exp(linspace(log 1/32,
    log 1/512, H))`` (loglinear, 1 - 1/32 for the first head to 1 - 1/512 for the last), written out here
    per head in float64, against the decays the mixer applies."""
    power2 = [1 - 2.0 ** (-5 - h) for h in range(n_heads)]
    step = (math.log(1 / 512) - math.log(1 / 32)) / max(n_heads - 1, 1)
    loglinear = [1 - math.exp(math.log(1 / 32) + h * step) for h in range(n_heads)]
    assert loglinear[0] == pytest.approx(1 - 1 / 32, rel=1e-15)
    if n_heads > 1:
        assert loglinear[-1] == pytest.approx(1 - 1 / 512, rel=1e-15)
    for decay, expected in (("power2", power2), ("loglinear", loglinear)):
        config, ctx = RetentionConfig(n_heads=n_heads, decay=decay), BlockContext(16 * n_heads, 2, 0, 64, 0.2)
        for log_decays in (head_log_decays(n_heads, decay), MultiScaleRetention(config, ctx).log_decays):
            assert [math.exp(g) for g in log_decays] == pytest.approx(expected, rel=1e-15, abs=0), decay


@pytest.mark.parametrize("T, form", [(AUTO_PARALLEL_MAX_LEN - 1, "parallel"), (AUTO_PARALLEL_MAX_LEN, "parallel"),
                                     (AUTO_PARALLEL_MAX_LEN + 1, "chunkwise")])
def test_auto_mode_is_parallel_up_to_its_threshold_and_chunkwise_beyond(T, form, monkeypatch):
    ran = []
    for name in ("parallel", "chunkwise"):
        op = getattr(retention, f"{name}_retention")
        monkeypatch.setattr(retention, f"{name}_retention",
                            lambda *args, name=name, op=op, **kwargs: ran.append(name) or op(*args, **kwargs))
    m = mixer(torch.float32, d_model=16, mode="auto")
    m(torch.randn(1, T, 16))
    assert ran == [form]


def test_mixer_is_causal_in_chunkwise_mode():
    m = as_mode(mixer(), "chunkwise", 8)
    x = torch.randn(1, 50, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 21:] = torch.randn(1, 29, 32, dtype=torch.float64)
    a, b = m(x), m(changed)
    assert torch.equal(a[:, :21], b[:, :21]) and not torch.allclose(a[:, 21:], b[:, 21:])


def test_autocast_bf16_mixer_matches_float64():
    m = mixer(torch.float32, d_model=64)
    x = torch.randn(2, 300, 64)
    expected = copy.deepcopy(m).double()(x.double())
    for mode in ("parallel", "chunkwise"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = as_mode(m, mode)(x)
        assert rel_rms(y, expected) <= 2e-2, mode


def test_chunkwise_forward_at_8192_tokens_in_bf16_is_finite():
    m = as_mode(mixer(torch.bfloat16, d_model=256), "chunkwise", 64)
    with torch.no_grad():
        y = m(torch.randn(1, 8192, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and y.abs().max() > 0


def small_retnet(**mixer_options):
    overrides = {"model.d_model": 64, "model.n_layers": 2, "model.ffn.d_hidden": 96,
                 "model.mixer": {"type": "retention", "n_heads": 4, **mixer_options}}
    return zoo.build_model(zoo.load_config("retnet-tiny", overrides)).double().eval()


def test_greedy_recurrent_decoding_equals_parallel_form_argmax():
    decoder = small_retnet(mode="chunkwise", chunk_size=8)
    reference = small_retnet(mode="parallel")
    reference.load_state_dict(decoder.state_dict())
    prompt = torch.randint(0, 257, (3, 21))
    generated = decoder.generate(prompt, max_new_tokens=16)
    with torch.no_grad():
        logits = reference(generated).logits
    assert torch.equal(logits[:, 20:-1].argmax(-1), generated[:, 21:])


def test_decoding_state_does_not_grow_and_snapshot_restores():
    model = small_retnet()
    ids = torch.randint(0, 257, (2, 10))
    small, large = model.init_states(2, 16), model.init_states(2, 100_000)
    assert [s.recurrent.shape for s in small] == [s.recurrent.shape for s in large] == [(2, 4, 16, 32)] * 2
    assert all(s.recurrent.dtype == torch.float64 for s in small)  # float32 for float32 and bf16 models
    states = model.init_states(2, 10 + 60)
    nbytes = [s.recurrent.nbytes for s in states]
    with torch.no_grad():
        model(ids, states=states)
        snapshots = [s.snapshot() for s in states]
        token = ids[:, -1:]
        first = [model(token, states=states).logits for _ in range(3)]
        for _ in range(57):
            model(token, states=states)
        assert [s.recurrent.nbytes for s in states] == nbytes and states[0].length == 70
        for s, snap in zip(states, snapshots):
            s.restore(snap)
        assert states[0].length == 10
        again = [model(token, states=states).logits for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_out_projection_uses_depth_scaled_init():
    m = init_weights(MultiScaleRetention(RetentionConfig(n_heads=4), BlockContext(256, 8, 0, 64, 0.02)))
    assert abs(m.proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.out.weight.std().item() - 0.02 / 4) < 0.0005


@pytest.mark.parametrize("options, message", [
    ({"n_heads": 3}, r"model.mixer: n_heads=3 does not divide model.d_model=256"),
    ({"mode": "fast"}, r"model.mixer.mode: 'fast' is not allowed; choose one of auto, parallel, chunkwise"),
    ({"decay": "xpos"}, r"model.mixer.decay: 'xpos' is not allowed; choose one of power2, loglinear"),
    ({"chunk_size": 0}, r"model.mixer: chunk_size must be positive, got 0"),
    ({"n_heads": 256}, r"rotary positions need an even key dimension per head"),
])
def test_bad_retention_options_name_the_key(options, message):
    with pytest.raises(zoo.ConfigError, match=message):
        zoo.load_config("retnet-tiny", {"model.mixer": options})
