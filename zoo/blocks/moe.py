"""Mixture-of-Experts FFNs: ``switch`` (:class:`Switch`, top-1 with expert capacity) and ``moe``
(:class:`TopKMoE`, top-k with shared experts); their class docstrings cite the equations they implement.

Both route with :class:`~zoo.blocks.router.Router`, hand the tokens to their dispatcher
(:mod:`zoo.blocks.dispatch`) and compute with packed :class:`~zoo.blocks.experts.Experts`. Capacity drops
happen at training only (dropped tokens get a zero output and pass through the residual); evaluation and
generation are dropless, so outputs stay causal. Balancing losses, any combination, each added already
weighted: ``aux_loss`` (:func:`~zoo.blocks.router.switch_aux_loss`), ``seq_aux_loss``
(:func:`~zoo.blocks.router.sequence_aux_loss`), ``z_loss`` (:func:`~zoo.blocks.router.router_z_loss`). Dense
layers among MoE ones (first-k-dense, every-other-layer) come from per-layer overrides:
``model.layers: {0: {ffn: {type: mlp}}}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.dispatch import LocalDispatcher, LocalDispatcherConfig
from zoo.blocks.experts import Dispatch, Experts
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.router import (Router, ScoreFunc, router_z_loss, sequence_aux_loss,
                               switch_aux_loss)
from zoo.errors import ConfigError, require_positive
from zoo.registry import BlockContext, register


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    d_hidden: int | None = None  # each routed expert's hidden size; None: 8/3 d_model / top_k, x64
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True  # divide the chosen weights by their sum
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts in n_group groups,
    topk_group: int = 1  # of which the topk_group best are searched
    jitter_noise: float = 0.0
    n_shared_experts: int = 0
    d_shared_hidden: int | None = None  # None: n_shared_experts * d_hidden (one wide SwiGLU)
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output times sigmoid(Linear(d -> 1))
    aux_loss_weight: float = 0.0  # Switch loss, 0.01 in the paper
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise loss, 1e-4 in the paper
    z_loss_weight: float = 0.0  # ST-MoE router z-loss, 1e-3 in the paper
    loss_free_bias: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing
    bias_update_rate: float = 1.0e-3  # its gamma
    freeze_router: bool = False  # fine-tuning: router weight without gradient, loss-free bias not updated
    dispatch: Dispatch = "auto"  # grouped_mm where it supports the dtype, else a per-expert loop

    def validate(self, model) -> None:
        require_positive(self, "n_experts", "top_k", "d_hidden", "n_group", "topk_group", "d_shared_hidden")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts % self.n_group:
            raise ConfigError(f"n_group={self.n_group} does not divide n_experts={self.n_experts}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * self.n_experts // self.n_group:
            raise ConfigError(f"top_k={self.top_k} exceeds the {self.topk_group * self.n_experts // self.n_group} "
                              f"experts of the topk_group={self.topk_group} kept groups")
        if self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not self.n_shared_experts:
            for name, unused in (("shared_expert_gate", self.shared_expert_gate),
                                 ("d_shared_hidden", self.d_shared_hidden is not None)):
                if unused:
                    raise ConfigError(f"{name}={getattr(self, name)!r} needs shared experts, but n_shared_experts=0; "
                                      f"set n_shared_experts >= 1 or remove {name}")
        for name in ("aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight", "bias_update_rate",
                     "jitter_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}")

    def hidden_size(self, d_model: int) -> int:
        return self.d_hidden or 64 * -(-8 * d_model // (3 * 64 * self.top_k))


@dataclass
class SwitchConfig:
    n_experts: int = 8
    d_hidden: int | None = None  # None: 8/3 d_model rounded up to a multiple of 64
    capacity_factor: float = 1.25  # expert capacity at training; evaluation is dropless
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    jitter_noise: float = 0.0
    dispatch: Dispatch = "auto"
    freeze_router: bool = False  # fine-tuning: router weight without gradient

    def validate(self, model) -> None:
        require_positive(self, "n_experts", "d_hidden", "capacity_factor")
        for name in ("aux_loss_weight", "z_loss_weight", "jitter_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class MoE(nn.Module):
    """Routed experts (+ shared experts); ``forward(x (B, T, d), aux) -> (B, T, d)``.

    The router chooses, ``self.dispatcher`` moves the tokens to ``self.experts`` and their outputs back
    (:mod:`zoo.blocks.dispatch`; parallelism code may assign another dispatcher). ``capacity_factor``
    (Switch) limits each expert to ``ceil(capacity_factor * B T k / E)`` tokens at training only.
    ``expert_init_scale`` multiplies the variance of the routed experts' initial weights (Switch's
    reduced scale ``s``). Reports ``aux.add_router_stats`` (tokens routed to each expert, before any
    drop) and the weighted balancing losses while training.

    While training, the routed counts go to the router's loss-free balancing load once per forward
    pass: only when ``aux`` records them, so a recomputation of this layer (activation checkpointing
    re-runs it during backward, after the model closed ``aux``) counts nothing; without ``aux`` (the
    layer called alone) they are counted directly.
    """

    def __init__(self, config: MoEConfig, ctx: BlockContext, capacity_factor: float | None = None,
                 expert_init_scale: float = 1.0):
        super().__init__()
        d_hidden = config.hidden_size(ctx.d_model)
        self.config, self.capacity_factor = config, capacity_factor
        expert_std = expert_init_scale ** 0.5  # a variance scale: it multiplies the std by its square root
        self.router = Router(ctx.d_model, config.n_experts, config.top_k, ctx.init_std, config.score_func,
                             config.norm_topk_prob, config.routed_scaling_factor, config.n_group,
                             config.topk_group, config.jitter_noise, config.loss_free_bias,
                             config.bias_update_rate, config.freeze_router)
        self.dispatcher = LocalDispatcher(LocalDispatcherConfig())
        self.experts = Experts(config.n_experts, ctx.d_model, d_hidden, expert_std * ctx.init_std,
                               expert_std * ctx.residual_init_std, config.dispatch)
        self.shared = self.shared_gate = None
        self.init_std = ctx.init_std
        if config.n_shared_experts:
            d_shared = config.d_shared_hidden or config.n_shared_experts * d_hidden
            self.shared = SwiGLU(ctx.d_model, d_shared, ctx)
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(ctx.d_model, 1, bias=False)

    def init_own_weights(self) -> None:
        """The shared-expert gate from ``N(0, init_std)``; router and experts fill their own."""
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=self.init_std)

    def forward(self, x: torch.Tensor, aux: AuxCollector | None = None) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        routing = self.router(flat)
        E, k = self.config.n_experts, self.config.top_k
        capacity = None
        if self.training and self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * B * T * k / E)
        out = self.dispatcher(flat, routing, self.experts, capacity)  # (B T, d) float32
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(flat))
            out = out + shared
        if aux is not None:
            self._report(aux, routing, B, T, capacity)
        elif self.training:
            self.router.record_load(torch.bincount(routing.indices.flatten(), minlength=E))
        return out.to(x.dtype).reshape(B, T, d)

    def _report(self, aux: AuxCollector, routing, B: int, T: int, capacity: int | None) -> None:
        config, E = self.config, self.config.n_experts
        routed = torch.bincount(routing.indices.flatten(), minlength=E)  # (E,)
        if aux.add_router_stats(routed) and self.training:
            self.router.record_load(routed)
        if capacity is not None:  # sort_by_expert keeps min(routed, capacity) rows of each expert
            dropped = (routed - routed.clamp(max=capacity)).sum() / routing.indices.numel()
            aux.add_metric("dropped_fraction", dropped)
        if not self.training:
            return
        if config.aux_loss_weight:
            aux.add_loss("aux_loss", config.aux_loss_weight * switch_aux_loss(routing.scores, routing.indices, E))
        if config.seq_aux_loss_weight:
            loss = sequence_aux_loss(routing.scores.view(B, T, E), routing.indices.view(B, T, -1), E)
            aux.add_loss("seq_aux_loss", config.seq_aux_loss_weight * loss)
        if config.z_loss_weight:
            aux.add_loss("z_loss", config.z_loss_weight * router_z_loss(routing.logits))

    def num_active_parameters(self) -> int:
        """What one token uses: the router, its ``top_k`` routed experts and the shared experts."""
        shared = sum(p.numel() for m in (self.shared, self.shared_gate) if m is not None for p in m.parameters())
        return self.router.weight.numel() + self.config.top_k * self.experts.params_per_expert() + shared


@register("ffn", "moe", config=MoEConfig)
class TopKMoE(MoE):
    """Dropless top-k MoE with shared experts (DeepSeek-V3, arXiv 2412.19437, §2.1.2; also Mixtral, Qwen2-MoE).

    ``h'_t = u_t + sum_{i <= N_s} FFN^(s)_i(u_t) + sum_{i <= N_r} g_{i,t} FFN^(r)_i(u_t)`` (Eq. 12) with
    ``n_shared_experts`` always-on experts ``FFN^(s)`` (one SwiGLU of width ``d_shared_hidden``; the
    residual ``u_t`` is added by the enclosing block) and ``N_r = n_experts`` routed ones. Affinities
    ``s_{i,t} = sigmoid(u_t . e_i)`` (Eq. 15; or softmax, Mixtral); the top-``top_k`` experts are chosen by
    ``s_{i,t} + b_i`` (Eq. 16; ``b`` is the loss-free bias, zero without it) and gated by the unbiased
    ``g'_{i,t} = s_{i,t}`` (Eq. 14), normalised ``g_{i,t} = g'_{i,t} / sum_j g'_{j,t}`` (Eq. 13, with
    ``norm_topk_prob``) and multiplied by ``routed_scaling_factor``. ``shared_expert_gate`` scales the
    shared output by ``sigmoid(w . u_t)`` as Qwen2-MoE does. ``(B, T, d) -> (B, T, d)``.
    """


# Fedus et al. 2021 §2.4: "we reduce the default Transformer initialization scale s = 1.0 by a factor of 10",
# s being the variance scale of the truncated-normal init (std sqrt(s / fan_in)).
SWITCH_EXPERT_INIT_SCALE = 0.1


@register("ffn", "switch", config=SwitchConfig)
class Switch(MoE):
    """Switch Transformer FFN (Fedus et al. 2021, "Switch Transformers"): top-1 routing with expert capacity.

    Router probabilities ``p_i(x) = softmax(W_r x)_i`` in float32 (Eq. 1); the output is the chosen
    expert's ``p_i(x) E_i(x)`` (Eq. 2 with one expert, the gate not renormalised). At training each expert
    takes at most ``ceil(capacity_factor * tokens / n_experts)`` tokens (§2.2, Eq. 3), the earliest first;
    the overflow gets a zero output and passes through the residual. Load-balancing loss
    ``aux_loss_weight`` times :func:`~zoo.blocks.router.switch_aux_loss`; experts initialised at the reduced scale
    ``s = 0.1`` (§2.4). ``(B, T, d) -> (B, T, d)``.
    """

    def __init__(self, config: SwitchConfig, ctx: BlockContext):
        moe = MoEConfig(n_experts=config.n_experts, top_k=1, d_hidden=config.d_hidden, norm_topk_prob=False,
                        jitter_noise=config.jitter_noise, aux_loss_weight=config.aux_loss_weight,
                        z_loss_weight=config.z_loss_weight, dispatch=config.dispatch,
                        freeze_router=config.freeze_router)
        super().__init__(moe, ctx, capacity_factor=config.capacity_factor,
                         expert_init_scale=SWITCH_EXPERT_INIT_SCALE)
