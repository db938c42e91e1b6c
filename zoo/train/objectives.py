"""Training objectives: what one training or validation step computes from a batch.

An objective is registered under the kind ``objective`` and chosen by ``train.objective: {type: ...}``;
``build_objective(spec)`` makes it, and ``objective(model, batch) -> ObjectiveOutput`` gives the loss to
minimise and what to log. The LightningModule knows nothing else about the loss, so a new objective (SFT,
DPO) is a new registered class, not a change to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zoo import registry
from zoo.registry import register
from zoo.schema import BlockSpec


@dataclass
class ObjectiveOutput:
    """One step's result. ``loss``: what the optimizer minimises (scalar). ``eval_loss`` (scalar) averaged
    over ``eval_weight`` items: what validation reports as ``val/loss`` (a weighted mean over batches).
    ``metrics``: scalars logged as ``train/<name>``. ``router_stats``: per MoE layer, tokens routed to each
    expert (for MaxVio). ``tokens``: how many tokens the step processed (for tokens/s). ``eval_metrics``:
    scalars validation reports as ``val/<name>``, averaged over batches weighted by ``eval_weight``.

    An objective may define ``prepare(model)``, called once with the model before training (the DPO
    reference is fixed there)."""

    loss: torch.Tensor
    eval_loss: torch.Tensor
    eval_weight: int
    tokens: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    router_stats: list[torch.Tensor] = field(default_factory=list)
    eval_metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CausalLMConfig:
    """``train.objective: {type: causal_lm}`` takes no options."""


@register("objective", "causal_lm", config=CausalLMConfig)
class CausalLM:
    """Next-token prediction on ``(B, T)`` token batches, labels = inputs shifted by the model: the model's
    own loss (cross-entropy, plus the weighted MoE balancing and MTP losses it adds). Validation reports the
    cross-entropy alone over the ``B (T - 1)`` predicted positions."""

    def __init__(self, config: CausalLMConfig):
        self.config = config

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        out = model(batch, labels=batch, return_logits=False)
        zero = torch.zeros((), device=batch.device)
        metrics = {"loss": out.loss, "lm_loss": out.lm_loss, **out.metrics,
                   **{name: zero if value is None else value
                      for name, value in (("aux_loss", out.aux_loss), ("mtp_loss", out.mtp_loss))}}
        return ObjectiveOutput(out.loss, out.lm_loss, batch.shape[0] * (batch.shape[1] - 1), batch.numel(),
                               {name: value.detach().float() for name, value in metrics.items()}, out.router_stats)


def build_objective(spec: BlockSpec):
    """The registered objective ``spec.type`` built with its options."""
    return registry.lookup("objective", spec.type).block(spec.options)
