"""The side channel through which blocks report auxiliary losses and routing statistics.

One :class:`AuxCollector` lives for one forward pass; every FFN receives it. A MoE layer calls
``add_loss(name, weighted_loss)`` for each balancing loss (already multiplied by its weight) and
``add_router_stats(tokens_per_expert)``; the model sums the losses into ``ZooOutput.aux_loss`` and
returns the statistics as ``ZooOutput.router_stats`` (one tensor per MoE layer, in layer order).

The model calls :meth:`~AuxCollector.close` when its forward pass ends. Activation
checkpointing (``torch.utils.checkpoint``) re-runs a block's forward during backward with the same
collector; closed, it ignores what that recomputation reports, and ``add_router_stats`` returning
False tells a layer not to count the pass again in its own state (e.g. loss-free balancing loads).
"""

from __future__ import annotations

import torch


class AuxCollector:
    def __init__(self):
        self.losses: dict[str, torch.Tensor] = {}
        self.router_stats: list[torch.Tensor] = []
        self.metrics: dict[str, list[torch.Tensor]] = {}
        self.closed = False

    def close(self) -> None:
        """End the forward pass: from now on every ``add_*`` call is ignored."""
        self.closed = True

    def add_loss(self, name: str, weighted_loss: torch.Tensor) -> None:
        """Add a scalar loss term (summed over layers under ``name``) to the training loss."""
        if self.closed:
            return
        previous = self.losses.get(name)
        self.losses[name] = weighted_loss if previous is None else previous + weighted_loss

    def add_router_stats(self, tokens_per_expert: torch.Tensor) -> bool:
        """Record one MoE layer's ``(n_experts,)`` count of tokens routed to each expert; returns whether
        it was recorded (False once closed: the pass is a recomputation and was counted already)."""
        if self.closed:
            return False
        self.router_stats.append(tokens_per_expert.detach())
        return True

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        """A scalar diagnostic (not a loss), e.g. a dropped-token fraction; averaged over layers."""
        if self.closed:
            return
        self.metrics.setdefault(name, []).append(value.detach())

    def total_loss(self) -> torch.Tensor | None:
        return sum(self.losses.values()) if self.losses else None
