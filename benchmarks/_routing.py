"""Routing measurements taken during a training run, for the MoE reproductions.

:class:`RouterTrace` is a Lightning callback: it hooks every MoE layer's router and, every ``every`` training
steps, records per layer the share of tokens routed to each expert (the expert-load curves), the fraction of
tokens dropped at the Switch capacity (Fedus et al. 2021, Eq. 3) and the mean router entropy. Kept beside the
benchmarks rather than as block metrics: per expert and per layer it would add hundreds of logged columns to
a large model's every step. :func:`forward_flops_per_token` counts a model's compute per token honestly,
router and dispatch included.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch

import zoo
from zoo.blocks.moe import MoE, router_entropy


class RouterTrace(L.Callback):
    """Per MoE layer, averaged over the training steps between records: ``load`` (each expert's share of the
    routed tokens), ``dropped`` (fraction of token-expert assignments over capacity) and ``entropy`` (mean
    router entropy, nats). ``trace`` is ``[{"step": s, "layers": {name: {...}}}]``."""

    def __init__(self, every: int):
        self.every, self.trace, self._sums, self._hooks = every, [], {}, []

    def on_train_start(self, trainer, pl_module) -> None:
        for name, layer in pl_module.model.named_modules():
            if isinstance(layer, MoE):
                self._hooks.append(layer.router.register_forward_hook(partial(self._record, name, layer)))

    def _record(self, name: str, layer: MoE, router, inputs, routing) -> None:
        if not router.training:
            return
        E = layer.config.n_experts
        counts = torch.bincount(routing.indices.flatten(), minlength=E).double()
        dropped = 0.0
        if layer.capacity_factor is not None:
            capacity = math.ceil(layer.capacity_factor * routing.indices.numel() / E)
            dropped = float((counts - counts.clamp(max=capacity)).sum()) / routing.indices.numel()
        sums = self._sums.setdefault(name, {"counts": torch.zeros(E, dtype=torch.float64), "dropped": 0.0,
                                            "entropy": 0.0, "passes": 0})
        sums["counts"] += counts
        sums["dropped"] += dropped
        sums["entropy"] += float(router_entropy(routing.scores.detach()))
        sums["passes"] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._sums and (step % self.every == 0 or step >= trainer.max_steps):
            self.trace.append({"step": step, "layers": {
                name: {"load": (s["counts"] / s["counts"].sum()).tolist(), "dropped": s["dropped"] / s["passes"],
                       "entropy": s["entropy"] / s["passes"]} for name, s in self._sums.items()}})
            self._sums = {}

    def on_train_end(self, trainer, pl_module) -> None:
        for hook in self._hooks:
            hook.remove()


def forward_flops_per_token(preset: str, overrides: list[str], seq_len: int) -> dict:
    """Forward FLOPs per token of ``preset`` + ``overrides`` at context ``seq_len`` (training: 3x).

    ``2 x`` the active non-embedding parameters (each weight a token uses: one multiply-add; for a MoE layer
    the router and its top-k experts, as ``num_parameters(active=True)`` counts them), the tied output head
    ``2 d V``, attention's scores and weighted sum over a causal window of ``seq_len / 2`` on average
    (``2 T d`` per layer), and the dispatch: per MoE layer the softmax and top-k over E scores (~5 E) and the
    gate's scaling of the expert output (d). Returns the total and each part.
    """
    model = zoo.create_model(preset, overrides=overrides)
    config = model.config
    d, V = config.d_model, config.vocab_size
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    parts = {"weights": 2 * (model.num_parameters(active=True) - V * d), "head": 2 * d * V,
             "attention": 2 * seq_len * d * config.n_layers,
             "dispatch": sum(5 * m.config.n_experts + d for m in moe_layers)}
    parts["router"] = sum(2 * m.router.weight.numel() for m in moe_layers)  # inside "weights"; shown apart
    return {"total": parts["weights"] + parts["head"] + parts["attention"] + parts["dispatch"], **parts}
