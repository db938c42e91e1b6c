"""Token dispatchers: how a MoE layer moves routed tokens to its experts and their outputs back.

A MoE layer routes (:class:`zoo.blocks.router.Router`), its dispatcher permutes the routed
``(token, expert)`` pairs to the experts and combines the expert outputs back per token, and the
experts (:class:`zoo.blocks.experts.Experts`) compute. The three meet in two contracts:

* the dispatcher: ``dispatcher(x (N, d), routing, experts, capacity) -> (N, d)`` float32,
  ``sum_k weight_k * expert_k(x)`` over each token's kept routed experts (GShard, Lepikhin et al. 2020,
  Algorithm 2: dispatch, expert computation, combine); ``capacity`` (or None) caps the rows per expert;
* the experts: ``experts(rows (R, d), pairs: Sorted) -> (R', d)`` float32, where ``pairs`` are rows
  sorted by expert, ``pairs.token`` indexing ``rows`` and ``pairs.weight`` scaling each output before
  the per-token sum (see :func:`zoo.blocks.experts.sort_by_expert`).

:class:`LocalDispatcher` (every expert on this process) hands the experts the tokens themselves with
the sorted pairs, so gather, grouped GEMMs and weighted scatter-add stay one fused autograd node.

Expert parallelism (:class:`AllToAllDispatcher`, assigned from outside by the parallelize step,
``moe.dispatcher = AllToAllDispatcher(config, group)``) leaves the Router and Experts untouched: with
``R`` ranks each owning ``E / R`` contiguous experts (the packed ``gate_up_proj`` / ``down_proj`` are
DTensors sharded on dim 0 and the experts compute with this rank's slice), the routed rows travel by
all-to-all to the rank owning their expert and their outputs travel back (GShard, Lepikhin et al.
2020, §2.2 and Algorithm 2).

A dispatcher is an ``nn.Module`` (so it follows the layer's ``train()`` / ``to()`` and can be found by
walking modules), registered as ``@register("dispatcher", name, config=...)`` and built from its
config dataclass: ``Dispatcher(config)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from zoo.blocks.experts import Experts, Sorted, sort_by_expert
from zoo.blocks.router import Routing
from zoo.registry import register


@dataclass
class LocalDispatcherConfig:
    """The local dispatcher has no options."""


@register("dispatcher", "local", config=LocalDispatcherConfig)
class LocalDispatcher(nn.Module):
    """Every expert on this process: sort the pairs by expert and let the experts gather, compute and
    combine in one fused node. ``forward(x (N, d), routing, experts, capacity) -> (N, d)`` float32."""

    def __init__(self, config: LocalDispatcherConfig):
        super().__init__()

    def forward(self, x: torch.Tensor, routing: Routing, experts: Experts, capacity: int | None) -> torch.Tensor:
        pairs = sort_by_expert(routing.indices, routing.weights, experts.n_experts, capacity)
        return experts(x, pairs)


@dataclass
class AllToAllDispatcherConfig:
    """The all-to-all dispatcher has no options; its process group comes from the parallelize step."""


@register("dispatcher", "all_to_all", config=AllToAllDispatcherConfig)
class AllToAllDispatcher(nn.Module):
    """Expert parallelism over the ranks of ``group`` (None: all ranks), each holding ``E / R`` experts.

    ``forward(x (N, d), routing, experts, capacity) -> (N, d)`` float32, equal to
    :class:`LocalDispatcher` over all ``E`` experts:

    1. sort this rank's ``(token, expert)`` pairs by global expert id (so grouped by owning rank);
    2. exchange the per-expert row counts (``all_to_all_single``), then the rows themselves with those split
       sizes (the autograd-capable functional all-to-all: its backward is the reverse all-to-all);
    3. order the received rows by local expert and run the experts on them with identity pairs (each row's
       expert output comes back unweighted);
    4. undo the order, send the outputs back by the reverse all-to-all and combine them per token with the
       gate weights (through which the router gets its gradient).
    """

    def __init__(self, config: AllToAllDispatcherConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        # Imported here: torch.distributed's functional collectives take a second to import, and ``import zoo``
        # must stay fast for those who never run expert parallelism.
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        self.group, self._all_to_all = group, all_to_all_single_autograd

    def forward(self, x: torch.Tensor, routing: Routing, experts: Experts, capacity: int | None) -> torch.Tensor:
        group = self.group if self.group is not None else dist.group.WORLD
        ranks, n_experts = dist.get_world_size(group), experts.n_experts
        pairs = sort_by_expert(routing.indices, routing.weights, n_experts, capacity)
        send_counts = pairs.counts.view(ranks, n_experts // ranks)  # (R, E / R): rows for each rank's experts
        recv_counts = torch.empty_like(send_counts)  # (R, E / R): rows from each rank for each local expert
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = self._all_to_all(x[pairs.token], recv_splits, send_splits, group)  # (R_recv, d)
        local_expert = torch.arange(n_experts // ranks, device=x.device).repeat(ranks)
        order = torch.sort(torch.repeat_interleave(local_expert, recv_counts.flatten()), stable=True).indices
        local_counts = recv_counts.sum(0)
        identity = Sorted(torch.arange(order.numel(), device=x.device),
                          torch.ones(order.numel(), dtype=torch.float32, device=x.device), local_counts,
                          torch.cumsum(local_counts, 0, dtype=torch.int32))
        outputs = experts(received[order], identity)  # (R_recv, d) float32, by local expert
        outputs = outputs[torch.argsort(order)]  # back in arrival order
        returned = self._all_to_all(outputs, send_splits, recv_splits, group)  # (S, d) in pairs order
        combined = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return combined.index_add(0, pairs.token, returned * pairs.weight[:, None])
