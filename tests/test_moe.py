"""MoE blocks: grouped dispatch vs the per-expert reference, swapped-in dispatchers, router properties,
balancing losses, Switch capacity, loss-free balancing (counted once under activation checkpointing).
Tolerances: float32 dispatch 1e-5; float64 dispatch and formulas 1e-12."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import zoo
from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.dispatch import LocalDispatcher
from zoo.blocks.experts import Sorted, naive_experts, pad_groups, sort_by_expert
from zoo.blocks.moe import MoEConfig, SwitchConfig, Switch, TopKMoE, router_entropy
from zoo.blocks.router import (Router, max_violation, router_z_loss, sequence_aux_loss,
                               switch_aux_loss)
from zoo.errors import ConfigError
from zoo.model import init_weights
from zoo.registry import BlockContext

CTX = BlockContext(d_model=32, n_layers=2, layer_idx=0, max_seq_len=64, init_std=0.2)


def moe(**options) -> TopKMoE:
    return init_weights(TopKMoE(MoEConfig(**{"n_experts": 8, "top_k": 2, "d_hidden": 24, **options}), CTX))


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("options", [
    {}, {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "top_k": 3},
    {"n_experts": 16, "top_k": 1, "norm_topk_prob": False},
])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
def test_dispatch_matches_naive_per_expert_loop(options, dispatch):
    layer = moe(dispatch=dispatch, **options)
    x = torch.randn(3, 10, 32, requires_grad=True)
    out = layer(x, AuxCollector())
    out.sum().backward()  # a zero-stride incoming gradient, which _grouped_mm's backward rejects raw
    grads = [x.grad, *(p.grad for p in layer.parameters())]

    x_ref = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    routing = layer.router(x_ref.reshape(30, 32))
    ref = naive_experts(x_ref.reshape(30, 32), routing.indices, routing.weights,
                        layer.experts.gate_up_proj, layer.experts.down_proj).reshape(3, 10, 32)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, [x_ref.grad, *(p.grad for p in layer.parameters())]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dispatch_under_bf16_autocast_runs_grouped_and_stays_close():
    layer = moe(dispatch="grouped_mm")
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)


def test_float64_falls_back_to_the_loop_and_grouped_mm_refuses_it():
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    assert moe().double()(x).dtype == torch.float64
    with pytest.raises(RuntimeError, match="dispatch='grouped_mm'"):
        moe(dispatch="grouped_mm").double()(x)


def test_padded_groups_keep_every_pair_and_pad_with_zero_weight_rows():
    indices = torch.tensor([[0, 2], [2, 1], [0, 2], [3, 0], [2, 1]])  # 5 tokens, top-2 of 4 experts
    weights = torch.rand(5, 2)
    pairs = sort_by_expert(indices, weights, 4)
    padded = pad_groups(pairs, n_tokens=5, align=4)
    assert padded.counts.tolist() == [4, 4, 4, 4]  # 3, 2, 4, 1 rows rounded up to multiples of 4
    assert padded.offsets.tolist() == [4, 8, 12, 16]
    real = padded.token != 5  # padding rows read token 5, the appended zero row
    assert torch.equal(padded.token[real], pairs.token) and torch.equal(padded.weight[real], pairs.weight)
    assert padded.weight[~real].abs().max() == 0
    start = 0
    for e, (count, padded_count) in enumerate(zip(pairs.counts.tolist(), padded.counts.tolist())):
        rows = padded.token[start:start + padded_count]
        assert (rows[:count] != 5).all() and (rows[count:] == 5).all()  # each expert's real rows first
        assert (indices[rows[:count]] == e).any(dim=1).all()
        start += padded_count


class _PerExpertLoopDispatcher(nn.Module):
    """Reference dispatcher: :func:`naive_experts`, each expert's tokens found by mask (dropless only)."""

    def forward(self, x, routing, experts, capacity):
        assert capacity is None
        return naive_experts(x, routing.indices, routing.weights, experts.gate_up_proj, experts.down_proj)


class _MovingRowsDispatcher(nn.Module):
    """The all-to-all recipe of :mod:`zoo.blocks.dispatch` on one rank: the rows themselves move to the
    experts, which run them with identity token ids and unit weights; the gate weights combine after."""

    def forward(self, x, routing, experts, capacity):
        pairs = sort_by_expert(routing.indices, routing.weights, experts.n_experts, capacity)
        rows = x[pairs.token]  # (S, d): what would be sent to the ranks owning the experts
        identity = Sorted(torch.arange(len(rows)), torch.ones(len(rows), dtype=pairs.weight.dtype),
                          pairs.counts, pairs.offsets)
        y = experts(rows, identity)  # (S, d): each row's expert output
        out = torch.zeros(x.shape, dtype=y.dtype)
        return out.index_add(0, pairs.token, y * pairs.weight[:, None].to(y.dtype))


@pytest.mark.parametrize("layer_type", ["moe", "switch"])
@pytest.mark.parametrize("dispatcher", [_PerExpertLoopDispatcher, _MovingRowsDispatcher])
@pytest.mark.parametrize("dispatch, dtype, tol", [("loop", torch.float64, 1e-12), ("grouped_mm", torch.float32, 1e-5)])
def test_swapped_in_dispatcher_matches_the_local_one(layer_type, dispatcher, dispatch, dtype, tol):
    """A dispatcher assigned from outside (``layer.dispatcher = ...``) gives the local dispatcher's outputs
    and gradients, router included; Switch runs at training, so its capacity drops tokens."""
    if layer_type == "switch":
        if dispatcher is _PerExpertLoopDispatcher:
            pytest.skip("the per-expert reference is dropless")
        layer = init_weights(Switch(SwitchConfig(n_experts=4, d_hidden=16, capacity_factor=1.0, dispatch=dispatch), CTX))
    else:
        layer = moe(score_func="sigmoid", n_group=4, topk_group=2, top_k=3, n_shared_experts=1, dispatch=dispatch)
    layer = layer.to(dtype).train()
    swapped = copy.deepcopy(layer)
    swapped.dispatcher = dispatcher()
    assert isinstance(layer.dispatcher, LocalDispatcher)
    x = torch.randn(3, 10, 32, dtype=dtype)
    grad_out = torch.randn(3, 10, 32, dtype=dtype)
    results = []
    for m in (layer, swapped):
        xx = x.clone().requires_grad_()
        aux = AuxCollector()
        out = m(xx, aux)
        out.backward(grad_out)
        results.append((out, xx.grad, *(p.grad for p in m.parameters())))
        if layer_type == "switch":
            assert aux.metrics["dropped_fraction"][0] > 0
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- router


def test_bias_changes_selection_never_the_weights():
    router = init_weights(Router(32, 8, 2, 0.2, score_func="sigmoid", norm_topk_prob=False, loss_free_bias=True))
    x = torch.randn(64, 32)
    before = router(x)
    router.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    after = router(x)
    assert not torch.equal(before.indices, after.indices)
    torch.testing.assert_close(after.scores, before.scores, rtol=0, atol=0)
    torch.testing.assert_close(after.weights, before.scores.gather(-1, after.indices), rtol=0, atol=0)


def test_normalised_weights_and_scaling_factor():
    router = init_weights(Router(32, 8, 3, 0.2, score_func="sigmoid", routed_scaling_factor=2.5))
    routing = router(torch.randn(16, 32))
    chosen = routing.scores.gather(-1, routing.indices)
    torch.testing.assert_close(routing.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_router_runs_in_float32_under_bf16_autocast():
    router = init_weights(Router(32, 8, 2, 0.2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(4, 32))
    assert routing.logits.dtype == routing.weights.dtype == torch.float32


def test_jitter_noise_is_multiplicative_on_the_router_input_at_training_only():
    """Switch §2.4: the router input is multiplied by U(1 - eps, 1 + eps) noise at training. With the
    router's weight the identity, its logits are the (jittered) input itself."""
    eps = 0.1
    router = init_weights(Router(16, 16, 1, 0.2, jitter_noise=eps))
    with torch.no_grad():
        router.weight.copy_(torch.eye(16))
    x = torch.randn(256, 16)
    x_before = x.clone()
    ratio = router.train()(x).logits / x
    assert torch.equal(x, x_before), "the input itself (which the experts also read) is not modified"
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    assert ratio.min() < 1 - 0.9 * eps and ratio.max() > 1 + 0.9 * eps, "it spans the whole range"
    assert not torch.equal(router(x).logits, router(x).logits), "fresh noise at every call"
    assert torch.equal(router.eval()(x).logits, x), "no noise in evaluation"
    router.jitter_noise = 0.0
    assert torch.equal(router.train()(x).logits, x), "none at training when jitter_noise is 0"


def test_group_limited_routing_stays_inside_kept_groups():
    router = init_weights(Router(32, 16, 4, 0.5, score_func="sigmoid", n_group=4, topk_group=2, loss_free_bias=True))
    router.expert_bias.normal_(std=0.3)
    routing = router(torch.randn(256, 32))
    biased = (routing.scores + router.expert_bias).view(256, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)  # (N, groups): sum of the top-2 biased scores
    kept = group_score.topk(2, dim=-1).indices
    chosen_group = routing.indices // 4
    assert (chosen_group[:, :, None] == kept[:, None, :]).any(-1).all()
    assert (chosen_group.min(-1).values != chosen_group.max(-1).values).any(), "both groups get used"


def test_bias_has_no_gradient_and_moves_only_in_the_hook_by_gamma():
    layer = moe(score_func="sigmoid", loss_free_bias=True, bias_update_rate=0.01).train()
    bias = layer.router.expert_bias
    assert not bias.requires_grad and all(p is not bias for p in layer.parameters())
    layer.router.expert_bias.copy_(torch.randn(8) * 0.1)
    start = bias.clone()
    for _ in range(3):
        layer(torch.randn(2, 12, 32), AuxCollector()).square().mean().backward()
    assert torch.equal(bias, start), "forward and backward never touch the bias"
    counted = layer.router.expert_load.clone()
    assert counted.sum() == 3 * 2 * 12 * 2

    reduced = []
    layer.router.on_optimizer_step(lambda t: reduced.append(t) or t * 2)  # two ranks that saw the same
    assert len(reduced) == 1 and torch.equal(reduced[0], counted)
    step = bias - start
    want = 0.01 * torch.sign(counted.mean() - counted)
    torch.testing.assert_close(step, want, rtol=0, atol=1e-7)  # exactly +-gamma up to float32 rounding
    assert layer.router.expert_load.sum() == 0, "the accumulated loads are reset after the update"


def test_bias_is_a_float32_checkpoint_buffer_and_eval_counts_nothing():
    layer = moe(loss_free_bias=True)
    state = layer.state_dict()
    assert "router.expert_bias" in state and "router.expert_load" not in state
    layer = layer.to(torch.bfloat16).eval()
    assert layer.router.expert_bias.dtype == torch.float32
    layer(torch.randn(1, 4, 32, dtype=torch.bfloat16))
    assert layer.router.expert_load.sum() == 0


# --------------------------------------------------------------------------- losses


def test_aux_losses_equal_their_weight_at_uniform_routing():
    E, k, B, T = 8, 2, 2, 16
    scores = torch.full((B, T, E), 1 / E, dtype=torch.float64)
    indices = torch.arange(B * T * k).view(B, T, k) % E  # every expert chosen equally often
    assert switch_aux_loss(scores.view(-1, E), indices.view(-1, k), E).item() == pytest.approx(1, abs=1e-12)
    assert sequence_aux_loss(scores, indices, E).item() == pytest.approx(1, abs=1e-12)
    sigmoid_scores = torch.full((B, T, E), 0.3, dtype=torch.float64)  # normalised over experts first
    assert sequence_aux_loss(sigmoid_scores, indices, E).item() == pytest.approx(1, abs=1e-12)

    layer = moe(aux_loss_weight=0.01, seq_aux_loss_weight=1e-4, z_loss_weight=1e-3).train()
    aux = AuxCollector()
    layer(torch.randn(2, 8, 32), aux)
    assert set(aux.losses) == {"aux_loss", "seq_aux_loss", "z_loss"}
    assert len(aux.router_stats) == 1 and aux.router_stats[0].sum() == 2 * 8 * 2


def test_aux_loss_matches_its_formula_when_skewed():
    scores = torch.softmax(torch.randn(10, 4, dtype=torch.float64), -1)
    indices = scores.argmax(-1, keepdim=True)
    f = torch.stack([(indices == i).double().mean() for i in range(4)])
    want = 4 * (f * scores.mean(0)).sum()
    torch.testing.assert_close(switch_aux_loss(scores, indices, 4), want, rtol=1e-12, atol=1e-12)


def test_weighted_switch_aux_loss_of_a_layer_equals_alpha_at_uniform_routing():
    """Fedus et al. 2021 Eq. 4: with every expert taking 1/E of the tokens (f_i = 1/E) and a mean router
    probability of 1/E each (P_i = 1/E), alpha * E * sum_i f_i P_i = alpha. Token type j puts a logit of
    3 on expert j and 0 elsewhere; the types come in equal numbers."""
    E, alpha = 4, 0.01
    layer = init_weights(Switch(SwitchConfig(n_experts=E, d_hidden=16, aux_loss_weight=alpha), CTX)).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = 3.0 * torch.eye(E)
    x = torch.zeros(1, 6 * E, 32)
    x[0, torch.arange(6 * E), torch.arange(6 * E) % E] = 1.0
    aux = AuxCollector()
    layer(x, aux)
    assert torch.equal(aux.router_stats[0], torch.full((E,), 6))  # balanced: f_i = 1/E
    assert aux.losses["aux_loss"].item() == pytest.approx(alpha, rel=1e-6)
    skewed = AuxCollector()  # the same layer, every token of type 0: the loss grows above alpha
    layer(torch.zeros(1, 8, 32).index_fill_(-1, torch.tensor([0]), 1.0), skewed)
    assert skewed.losses["aux_loss"].item() > 2 * alpha


def test_sequence_aux_loss_matches_deepseek_v3_eq_17_to_20_when_skewed():
    """Eq. 17-20 written out per sequence in float64: f_i = E / (k T) * #{t: i in top-k of token t},
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}, P_i = mean_t s'_{i,t}, loss = sum_i f_i P_i; mean over sequences."""
    E, k, B, T = 6, 2, 3, 7
    g = torch.Generator().manual_seed(3)
    scores = torch.sigmoid(torch.randn(B, T, E, dtype=torch.float64, generator=g) + torch.linspace(2, -2, E))
    indices = scores.topk(k, dim=-1).indices  # skewed: the first experts are chosen far more often
    want = 0.0
    for b in range(B):
        s, chosen = scores[b].tolist(), indices[b].tolist()
        for i in range(E):
            f_i = E / (k * T) * sum(i in chosen[t] for t in range(T))
            p_i = sum(s[t][i] / sum(s[t]) for t in range(T)) / T
            want += f_i * p_i / B
    assert want > 1.2  # far from the uniform value 1
    assert sequence_aux_loss(scores, indices, E).item() == pytest.approx(want, rel=1e-12)


def test_z_loss_matches_its_formula():
    logits = torch.randn(7, 5, dtype=torch.float64)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-12)


def test_max_violation():
    assert max_violation(torch.tensor([4, 4, 4, 4])).item() == 0
    assert max_violation(torch.tensor([10, 2, 2, 2])).item() == pytest.approx(1.5)


# --------------------------------------------------------------------------- switch


def test_switch_capacity_drops_the_overflow_at_training_only():
    E, N = 4, 24
    layer = init_weights(Switch(SwitchConfig(n_experts=E, d_hidden=16, capacity_factor=1.0), CTX))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with x[..., 0] > 0 goes to expert 2
    x = torch.randn(1, N, 32)
    x[..., 0] = x[..., 0].abs() + 1
    capacity = math.ceil(1.0 * N / E)
    aux = AuxCollector()
    out = layer.train()(x, aux)[0]
    processed = out.abs().sum(-1) > 0
    assert processed.sum() == capacity and processed[:capacity].all(), "the earliest tokens are kept"
    assert aux.metrics["dropped_fraction"][0].item() == pytest.approx(1 - capacity / N)
    assert torch.equal(aux.router_stats[0], torch.tensor([0, 0, N, 0]))

    block_out = x + layer(x, AuxCollector())  # dropped tokens pass through the residual unchanged
    assert torch.equal(block_out[0, capacity:], x[0, capacity:])

    with torch.no_grad():
        full = layer.eval()(x)[0]
    assert (full.abs().sum(-1) > 0).all(), "evaluation is dropless"
    torch.testing.assert_close(full[:capacity], out[:capacity])
    probs = torch.softmax(layer.router.weight @ x[0].T, 0)[2]  # the gate p_i(x) scales the output
    gate_up, down = layer.experts.gate_up_proj[2], layer.experts.down_proj[2]
    gate, up = (x[0] @ gate_up.T).chunk(2, -1)
    torch.testing.assert_close(full, probs[:, None] * (F.silu(gate) * up) @ down.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [None, 1.0])
def test_switch_experts_start_at_the_reduced_init_scale(scale):
    """Fedus et al. 2021 §2.4: the init scale s (a variance, std = sqrt(s / fan_in)) is reduced from 1.0
    to 0.1, so the experts' std is sqrt(0.1) of the usual one (DESIGN §8); the router's is unchanged.
    ``expert_init_scale=1.0`` restores the usual std."""
    options = {} if scale is None else {"expert_init_scale": scale}
    switch = init_weights(Switch(SwitchConfig(n_experts=8, d_hidden=64, **options), CTX))
    usual = {"gate_up_proj": CTX.init_std, "down_proj": CTX.residual_init_std}
    for name, std in usual.items():
        got = getattr(switch.experts, name).std().item()
        assert got == pytest.approx(math.sqrt(scale or 0.1) * std, rel=0.03), name
        assert getattr(moe(d_hidden=64).experts, name).std().item() == pytest.approx(std, rel=0.03), name
    assert switch.router.weight.std().item() == pytest.approx(CTX.init_std, rel=0.1)


def test_switch_expert_init_scale_must_be_positive():
    with pytest.raises(ConfigError, match="expert_init_scale"):
        zoo.load_config("switch-tiny", ["model.ffn.expert_init_scale=0"])


def test_router_entropy_metric_is_the_mean_entropy_of_the_normalised_scores():
    """``router_entropy`` (training only) against a float64 reference: log E for uniform scores, 0 for one-hot,
    and the mean of -sum p log p for random sigmoid scores (normalised per token)."""
    E = 4
    assert router_entropy(torch.full((3, E), 0.25, dtype=torch.float64)).item() == pytest.approx(math.log(E))
    assert router_entropy(torch.eye(E, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    scores = torch.rand(5, E, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = scores / scores.sum(-1, keepdim=True)
    assert router_entropy(scores).item() == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-12)
    layer = init_weights(Switch(SwitchConfig(n_experts=E, d_hidden=16), CTX))
    x = torch.randn(2, 6, CTX.d_model)
    for training in (False, True):
        aux = AuxCollector()
        layer.train(training)(x, aux)
        assert ("router_entropy" in aux.metrics) == training
    assert 0 < aux.metrics["router_entropy"][0].item() <= math.log(E) + 1e-6


# --------------------------------------------------------------------------- model level


def test_active_parameters_count_top_k_routed_plus_shared_and_router():
    layer = moe(n_shared_experts=1, shared_expert_gate=True)
    per_expert = 3 * 32 * 24
    assert layer.num_active_parameters() == 8 * 32 + 2 * per_expert + per_expert + 32
    model = zoo.create_model("deepseek-moe-tiny", n_layers=2)
    dense = model.num_parameters() - sum(p.numel() for p in model.blocks[1].ffn.parameters())
    assert model.num_parameters(active=True) == dense + model.blocks[1].ffn.num_active_parameters()


@pytest.mark.parametrize("bad, match", [
    ({"n_group": 3}, "n_group=3 does not divide n_experts=8"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "top_k=3 exceeds the 2 experts"),
    ({"top_k": 9}, "top_k=9 exceeds n_experts=8"),
    ({"score_func": "tanh"}, "softmax, sigmoid"),
    ({"shared_expert_gate": True}, "shared_expert_gate=True needs shared experts, but n_shared_experts=0"),
    ({"d_shared_hidden": 64}, "d_shared_hidden=64 needs shared experts, but n_shared_experts=0"),
])
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(zoo.ConfigError, match=match):
        zoo.load_config("dense-tiny", {"model.ffn": {"type": "moe", "n_experts": 8, **bad}})


class _SkewedTinyModel(nn.Module):
    """Embedding -> MoE -> head on synthetic tokens, with a constant input feature on which the router
    gives expert 0 a logit offset: a deliberately skewed router."""

    def __init__(self, gamma: float):
        super().__init__()
        self.embed = nn.Embedding(32, 31)
        self.moe = moe(score_func="sigmoid", loss_free_bias=True, bias_update_rate=gamma)
        self.head = nn.Linear(32, 32)
        with torch.no_grad():
            self.moe.router.weight[:, 0] = 0.0
            self.moe.router.weight[0, 0] = 3.0

    def forward(self, tokens):
        h = self.embed(tokens)
        x = torch.cat([torch.ones_like(h[..., :1]), h], dim=-1)
        return self.head(self.moe(x, AuxCollector()))


def _train_skewed(gamma: float, steps: int = 300) -> float:
    torch.manual_seed(0)
    model = _SkewedTinyModel(gamma).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loads = torch.zeros(8)
    for step in range(steps):
        tokens = torch.randint(0, 32, (16, 32))
        loss = F.cross_entropy(model(tokens).flatten(0, 1), ((tokens * 7 + 3) % 32).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= steps - 20:
            loads += model.moe.router.expert_load
        model.moe.router.on_optimizer_step(lambda t: t)
    return max_violation(loads).item()


@pytest.fixture
def one_thread():
    # 600 steps of tiny ops: OpenMP barriers dominate them on a CPU shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_free_balancing_fixes_a_skewed_router_and_gamma_zero_does_not(one_thread):
    assert _train_skewed(gamma=0.0) > 1.0
    assert _train_skewed(gamma=1e-3) < 0.2  # DeepSeek-V3's gamma


class _Checkpointed(nn.Module):
    """A decoder block whose forward is recomputed during backward (activation checkpointing)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, aux, state=None):
        return checkpoint(self.block, x, aux, state, use_reentrant=False)


def test_checkpointed_blocks_count_expert_loads_once_per_step():
    """Checkpointing re-runs each MoE layer's forward in backward; the loss-free balancing loads, the
    router statistics and so the bias update must be those of the plain run."""
    plain = zoo.create_model("deepseek-moe-tiny", n_layers=3, d_model=64, mixer={"n_heads": 4, "n_kv_heads": 2},
                             ffn={"d_hidden": 32}).train()
    recomputed = copy.deepcopy(plain)
    recomputed.blocks = nn.ModuleList(_Checkpointed(block) for block in recomputed.blocks)
    ids = torch.randint(0, 257, (2, 16))
    outputs, routers = [], []
    for model in (plain, recomputed):
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs.append(out)
        routers.append([m for m in model.modules() if isinstance(m, Router)])
    assert len(routers[1]) == 2
    for a, b in zip(*routers):
        assert a.expert_load.sum() == 2 * 16 * 4  # tokens x top_k, once
        assert torch.equal(b.expert_load, a.expert_load)
        for r in (a, b):
            r.on_optimizer_step(lambda t: t)
        assert a.expert_bias.abs().sum() > 0 and torch.equal(b.expert_bias, a.expert_bias)
    assert all(len(out.router_stats) == 2 for out in outputs), "one entry per MoE layer, none from recomputing"
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=0, atol=0)
    for p, q in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)


def test_a_closed_collector_records_nothing_and_a_layer_alone_counts_its_load():
    aux = AuxCollector()
    assert aux.add_router_stats(torch.ones(4)) is True
    aux.close()
    assert aux.add_router_stats(torch.ones(4)) is False
    aux.add_loss("aux_loss", torch.tensor(1.0))
    aux.add_metric("dropped_fraction", torch.tensor(0.5))
    assert len(aux.router_stats) == 1 and not aux.losses and not aux.metrics

    layer = moe(loss_free_bias=True).train()
    layer(torch.randn(2, 12, 32))  # no collector: the layer counts its load itself
    assert layer.router.expert_load.sum() == 2 * 12 * 2
    layer(torch.randn(2, 12, 32), aux)  # a closed collector: a recomputation, already counted
    assert layer.router.expert_load.sum() == 2 * 12 * 2
