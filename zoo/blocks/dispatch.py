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

Expert parallelism plugs in as another registered dispatcher, assigned from outside
(``moe.dispatcher = AllToAllDispatcher(...)``, e.g. by a ``parallelize`` function walking the model),
with the Router and Experts untouched. With ``R`` ranks each owning ``E / R`` contiguous experts (the
parallelize function slices ``gate_up_proj`` / ``down_proj`` along dim 0), its ``forward`` would:

1. ``pairs = sort_by_expert(routing.indices, routing.weights, E, capacity)``: rows sorted by global
   expert id, hence grouped by the rank owning the expert; ``send = x[pairs.token]`` ``(S, d)``.
2. ``all_to_all_single`` the per-expert counts (``pairs.counts`` viewed ``(R, E / R)``), so each rank
   knows how many rows of each of its experts it receives from each rank, then ``all_to_all_single``
   the rows with ``input_split_sizes`` the per-rank sums of ``pairs.counts`` (the differentiable
   ``torch.distributed.nn.functional.all_to_all_single``, so gradients flow back the same way).
3. Order the received rows ``(R_recv, d)`` by local expert (a stable sort of their local expert ids,
   arriving grouped by source rank), then call ``experts(received, identity)`` with ``identity =
   Sorted(token=arange(R_recv), weight=ones(R_recv), counts=local_counts, offsets=cumsum)``: identity
   token indices and unit weights make the experts' weighted scatter-add a plain copy, so it returns
   each received row's expert output ``(R_recv, d)`` (CPU padding of the groups still happens inside).
4. Undo the local sort, ``all_to_all_single`` the outputs back with the split sizes swapped, giving
   ``y (S, d)`` in ``pairs`` order, and combine with the gate weights:
   ``zeros(N, d).index_add_(0, pairs.token, y * pairs.weight[:, None])``, through which the router
   weights get their gradient.

A dispatcher is an ``nn.Module`` (so it follows the layer's ``train()`` / ``to()`` and can be found by
walking modules), registered as ``@register("dispatcher", name, config=...)`` and built from its
config dataclass: ``Dispatcher(config)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.blocks.experts import Experts, sort_by_expert
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
