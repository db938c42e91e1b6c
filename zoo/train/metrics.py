"""Training metrics across data-parallel ranks: sums, and MoE load balance (MaxVio)."""

from __future__ import annotations

import math

import torch

from zoo.blocks.router import max_violation


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a cross-entropy in nats, ``inf`` where that overflows a float (loss above ~709.78)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the data-parallel ranks (itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def moe_max_violation(tokens_per_expert: list[torch.Tensor]) -> float:
    """MaxVio (Wang et al. 2024, Eq. 7) of each MoE layer over its own experts, averaged over
    the layers; ``tokens_per_expert`` holds one ``(n_experts,)`` count per layer, sizes may differ."""
    return torch.stack([max_violation(counts) for counts in tokens_per_expert]).mean().item()


def add_counts(total: list[torch.Tensor] | None, counts: list[torch.Tensor]) -> list[torch.Tensor]:
    counts = [c.float() for c in counts]
    return counts if total is None else [t + c for t, c in zip(total, counts)]


def all_reduce_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer counts summed over ranks, in one collective for all layers."""
    return list(all_reduce_sum(torch.cat(counts)).split([c.numel() for c in counts]))


def load_fractions(counts: list[torch.Tensor]) -> torch.Tensor:
    """``(layers, max n_experts)`` load fractions; a layer with fewer experts is padded with NaN."""
    load = torch.full((len(counts), max(c.numel() for c in counts)), float("nan"))
    for row, c in zip(load, counts):
        row[:c.numel()] = (c / c.sum()).cpu()
    return load
