"""Post-training objectives: ``sft`` (supervised fine-tuning on chat data) and ``dpo`` (preference alignment).

Both read the padded batches of :mod:`zoo.train.chat_data` (``{"input_ids", "labels"}``, labels ``-100``
where nothing is scored) and register under the kind ``objective`` like :class:`~zoo.train.objectives.CausalLM`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters import adapter_disabled, has_adapter
from zoo.errors import ConfigError
from zoo.registry import register
from zoo.train.objectives import ObjectiveOutput


@dataclass
class SFTConfig:
    """``train.objective: {type: sft}`` takes no options."""


@register("objective", "sft", config=SFTConfig)
class SFT:
    """Supervised fine-tuning (instruction tuning; Ouyang et al. 2022 §3.5, Wei et al. 2022 "FLAN"):
    next-token cross-entropy on the assistant's tokens only, ``-sum_t m_t log p(x_t | x_<t) / sum_t m_t``
    with ``m_t = 1`` on assistant replies (the ``labels`` not ``-100``), plus the model's weighted MoE and
    MTP losses. Validation reports the cross-entropy over the scored tokens."""

    def __init__(self, config: SFTConfig):
        self.config = config

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]
        out = model(input_ids, labels=labels, return_logits=False)
        zero = torch.zeros((), device=input_ids.device)
        metrics = {"loss": out.loss, "lm_loss": out.lm_loss, **out.metrics,
                   **{name: zero if value is None else value
                      for name, value in (("aux_loss", out.aux_loss), ("mtp_loss", out.mtp_loss))}}
        scored = int((labels[:, 1:] != -100).sum())
        return ObjectiveOutput(out.loss, out.lm_loss, scored, int((labels != -100).sum()),
                               {name: value.detach().float() for name, value in metrics.items()}, out.router_stats)


@dataclass
class DPOConfig:
    """``train.objective: {type: dpo, beta: 0.1, loss: sigmoid}``."""

    beta: float = 0.1  # KL strength (DPO's beta; IPO's tau)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: ``sum_t log p(labels[t] | < t)`` over the scored positions (labels not ``-100``) of
    ``logits (B, T, V)``, position ``t - 1`` predicting ``labels[t]``; in float32 at least."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid") -> torch.Tensor:
    """Per-pair losses ``(B,)`` from sequence log-probabilities.

    ``sigmoid``: DPO (Rafailov et al. 2023, Eq. 7), ``-log sigma(beta log pi(y_w)/pi_ref(y_w) - beta log
    pi(y_l)/pi_ref(y_l))``. ``ipo``: IPO (Azar et al. 2023, Eq. 17), ``(h - 1 / (2 tau))^2`` with ``h`` the same
    difference of log-ratios and ``tau = beta``, on the summed log-probabilities as the paper writes it (TRL
    divides each log-ratio by its response length first)."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}; choose sigmoid or ipo")


@register("objective", "dpo", config=DPOConfig)
class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023) on ``(2B, T)`` batches, chosen then rejected.

    Loss: the mean of :func:`dpo_loss` over the ``B`` pairs, plus the policy's weighted MoE losses.
    Reference ``pi_ref``: the model with its adapter disabled when it has one (no second copy; the adapter
    is the only thing trained), else a frozen copy of the model :meth:`prepare` saw (the run's initial weights).
    The reference runs in eval mode under ``no_grad``: no dropout, and its routing counts no MoE load.
    Metrics (``train/`` and ``val/``): the implicit rewards ``beta log pi(y|x)/pi_ref(y|x)`` (§5) averaged over
    chosen and rejected responses, ``reward_margin`` (chosen minus rejected) and ``reward_accuracy`` (the
    share of pairs whose chosen reward is larger, ties counting one half: 0.5 while the policy is the
    reference, where TRL reports 0)."""

    def __init__(self, config: DPOConfig):
        self.config = config
        self.reference: nn.Module | None = None

    def prepare(self, model: nn.Module) -> None:
        """Fix the reference: the adapter-free base of ``model``, or a frozen copy of it as it is now."""
        if has_adapter(model):
            self.reference = None
            return
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def reference_logps(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(2B,)`` sequence log-probabilities under the reference."""
        with torch.no_grad():
            if self.reference is None:
                with adapter_disabled(model), _eval_mode(model):
                    return sequence_logps(model(input_ids).logits, labels)
            device = input_ids.device
            if next(self.reference.parameters()).device != device:
                self.reference.to(device)
            return sequence_logps(self.reference(input_ids).logits, labels)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        if self.reference is None and not has_adapter(model):
            self.prepare(model)
        input_ids, labels = batch["input_ids"], batch["labels"]
        B = input_ids.shape[0] // 2
        out = model(input_ids)
        policy = sequence_logps(out.logits, labels)
        reference = self.reference_logps(model, input_ids, labels)
        losses = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.config.beta, self.config.loss)
        pair_loss = losses.mean()
        aux = sum(out.aux_losses.values()) if out.aux_losses else None
        loss = pair_loss if aux is None else pair_loss + aux
        rewards = self.config.beta * (policy - reference).detach()
        chosen, rejected = rewards[:B], rewards[B:]
        wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
        scores = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                  "reward_accuracy": wins.mean(), "reward_margin": (chosen - rejected).mean()}
        metrics = {"loss": loss.detach(), "dpo_loss": pair_loss.detach(), **scores, **out.metrics}
        if aux is not None:
            metrics["aux_loss"] = aux.detach()
        return ObjectiveOutput(loss, pair_loss.detach(), B, int((labels != -100).sum()),
                               {name: value.detach().float() for name, value in metrics.items()}, out.router_stats,
                               eval_metrics={name: value.float() for name, value in scores.items()})


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

