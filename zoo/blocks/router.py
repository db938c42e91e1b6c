"""Token-choice top-k router with the balancing losses and the auxiliary-loss-free bias.

Scores ``s = softmax(x W_r^T)`` (Switch, Fedus et al. 2021, Eq. 1) or ``s = sigmoid(x W_r^T)``
(DeepSeek-V3, arXiv 2412.19437, Eq. 15), always computed in float32 (bf16 routers diverged in the
Switch paper). Experts are *selected* on ``s + b`` and *weighted* by the unbiased ``s`` (DeepSeek-V3
Eq. 16): the bias ``b`` only steers which experts are chosen. Group-limited routing (DeepSeek-V3,
``n_group``/``topk_group``) keeps the ``topk_group`` groups with the largest sum of their top-2 biased
scores and picks the top-k inside them.

Loss-free balancing (Wang et al. 2024, arXiv 2408.15664, Algorithm 1): during training the MoE
layer adds the tokens sent to each expert with :meth:`Router.record_load`, once per forward pass (the
layer, not the router's forward, knows whether a pass is a recomputation); after each optimizer step
:meth:`Router.on_optimizer_step` moves ``b_i += gamma * sign(mean_load - load_i)`` from the counts of
the whole (accumulated, all-reduced) batch. ``b`` is a float32 buffer saved in checkpoints and never
gets a gradient.

The router losses are plain, unweighted functions of the router outputs. The balance losses
:func:`switch_aux_loss` and :func:`sequence_aux_loss` equal 1 at perfectly uniform routing, so each
weighted loss then equals its weight ``alpha``. :func:`router_z_loss` penalises the logits' size, not
imbalance: at uniform routing (all ``E`` logits equal to ``c``) it is ``(c + log E)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

ScoreFunc = Literal["softmax", "sigmoid"]


@dataclass
class Routing:
    """One routing decision for ``N`` tokens.

    ``weights (N, k)`` float32 gate weights of the chosen experts, ``indices (N, k)`` int64 expert ids,
    ``logits (N, E)`` and ``scores (N, E)`` the float32 router logits and unbiased scores.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor


class Router(nn.Module):
    """``x (N, d_model) -> Routing``: linear scores, optional bias for selection, top-k, gate weights.

    ``norm_topk_prob`` divides the chosen weights by their sum (+1e-20), then ``routed_scaling_factor``
    multiplies them. ``jitter_noise`` multiplies the router input by ``U(1 - eps, 1 + eps)`` at
    training (Switch §2.4). ``loss_free_bias`` adds the balancing bias ``expert_bias`` updated with
    rate ``bias_update_rate`` (gamma) in :meth:`on_optimizer_step`. ``frozen`` (fine-tuning with
    ``freeze_router``) keeps both as they are: the weight gets no gradient and the bias never moves.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, init_std: float,
                 score_func: ScoreFunc = "softmax", norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 jitter_noise: float = 0.0, loss_free_bias: bool = False, bias_update_rate: float = 1e-3,
                 frozen: bool = False):
        super().__init__()
        self.frozen = frozen
        self.n_experts, self.top_k = n_experts, top_k
        self.score_func, self.norm_topk_prob = score_func, norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group, self.topk_group = n_group, topk_group
        self.jitter_noise = jitter_noise
        self.bias_update_rate = bias_update_rate
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_experts, d_model), requires_grad=not frozen)
        if loss_free_bias:
            self.register_buffer("expert_bias", torch.empty(n_experts, dtype=torch.float32))
            self.register_buffer("expert_load", torch.empty(n_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = self.expert_load = None

    def init_own_weights(self) -> None:
        """Router weights from ``N(0, init_std)``; the balancing bias and the load counts start at zero."""
        nn.init.normal_(self.weight, std=self.init_std)
        for buffer in (self.expert_bias, self.expert_load):
            if buffer is not None:
                nn.init.zeros_(buffer)

    def forward(self, x: torch.Tensor) -> Routing:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            if self.training and self.jitter_noise > 0:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
            logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
            scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
            with torch.no_grad():
                indices = self._select(scores)  # (N, k)
            weights = scores.gather(-1, indices)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            weights = weights * self.routed_scaling_factor
        return Routing(weights, indices, logits, scores)

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        biased = scores if self.expert_bias is None else scores + self.expert_bias
        if self.n_group > 1:
            grouped = biased.unflatten(-1, (self.n_group, -1))  # (N, G, E / G)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        return biased.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Add ``(n_experts,)`` routed-token counts to the load of the next balancing update (a no-op
        without ``loss_free_bias``)."""
        if self.expert_load is not None:
            self.expert_load += tokens_per_expert

    @torch.no_grad()
    def on_optimizer_step(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Loss-free balancing update from the loads counted since the last step (then reset)."""
        if self.expert_bias is None:
            return
        if self.frozen:
            self.expert_load.zero_()
            return
        load = all_reduce(self.expert_load.clone())
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()

    def _apply(self, fn, recurse=True):
        # The bias moves in steps of gamma ~ 1e-3: it must stay float32 when the model is cast to bf16.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "expert_load"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self


def switch_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch load-balancing loss ``N * sum_i f_i * P_i`` (Fedus et al. 2021, Eq. 4-6), unweighted.

    ``f_i`` is the fraction of the ``(token, slot)`` assignments ``indices (N, k)`` sent to expert
    ``i``, ``P_i`` the mean over tokens of the normalised score ``scores (N, E)``. Equals 1 at uniform
    routing, so the weighted loss equals its weight ``alpha``.
    """
    probs = scores / scores.sum(-1, keepdim=True)
    f = torch.bincount(indices.flatten(), minlength=n_experts).to(probs.dtype) / indices.numel()
    return n_experts * (f * probs.mean(0)).sum()


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``sum_i f_i P_i`` (Eq. 17-20), unweighted.

    ``scores (B, T, E)`` and ``indices (B, T, k)`` per sequence; ``f_i = E / (k T) * #{t: i chosen}``,
    ``P_i = mean_t s'_{i,t}`` with ``s'`` the scores normalised over experts. Mean over sequences;
    1 at uniform routing.
    """
    B, T, k = indices.shape
    probs = scores / scores.sum(-1, keepdim=True)
    counts = torch.zeros(B, n_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, indices.flatten(1), torch.ones(B, T * k, dtype=probs.dtype, device=probs.device))
    f = counts * n_experts / (k * T)
    return (f * probs.mean(1)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_x logsumexp(logits(x))^2`` (Zoph et al. 2022, Eq. 5), unweighted."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def max_violation(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """MaxVio ``(max_i load_i - mean load) / mean load`` (Wang et al. 2024, Eq. 7); 0 when balanced.

    ``tokens_per_expert``: ``(n_experts,)`` or ``(layers, n_experts)``; several rows are averaged."""
    load = tokens_per_expert.float()
    mean = load.mean(dim=-1).clamp_min(1e-9)
    return ((load.max(dim=-1).values - mean) / mean).mean()
