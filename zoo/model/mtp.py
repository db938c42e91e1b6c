"""Multi-token prediction (MTP): extra modules that predict tokens further ahead.

**Sequential** (DeepSeek-V3, arXiv 2412.19437 §2.2, Eq. 21-25). Module ``k = 1..D`` at position ``i``
combines the previous depth's hidden state ``h^{k-1}_i`` with the embedding of token ``t_{i+k}``::

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]     (Eq. 21, 2d -> d projection M_k)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                             (Eq. 22, one Transformer block)
    P^k_{i+k+1} = OutHead(h^k_i)                                   (Eq. 23, shared head after a final norm)
    L_MTP = lambda / D * sum_k CE(P^k, t_{i+k+1})                  (Eq. 24-25)

The concatenation puts the **embedding first**, the order of the released DeepSeek-V3 weights
(``eh_proj`` acting on ``[enorm(emb); hnorm(h)]``; the paper's Eq. 21 writes the hidden state first).
Embedding and output head are the main model's own (shared, not copied).

**Which hidden state feeds depth 1.** ``h^0`` is the main model's last hidden state *before* its final
norm, as in DeepSeek-V3's released inference code and torchtitan (transformers feeds the normalised one).
Reasons: module 1 normalises ``h^0`` with its own RMSNorm anyway, so the final norm's gain would only be
undone; the main model's final norm then serves the main head alone, exactly as without MTP; and the
pre-norm state is what :meth:`zoo.model.decoder.ZooModel.hidden_states` returns during decoding, where the
modules draft tokens.

**Parallel** (Gloeckle et al. 2024, arXiv 2404.19737 §2): ``D`` independent heads on the shared trunk;
head ``k`` runs one Transformer block on ``h^0`` (no token embedding, no projection), a final norm and
the shared unembedding, and predicts ``t_{i+k+1}``. (Gloeckle et al. count the next-token head among
their ``n``; here it is the main model's head, so ``n = D + 1``.)

Each module's block is a :class:`zoo.model.block.Block` with the registry's mixer and FFN (the model's own by
default), so MoE FFNs report their aux losses and router counts, and their balancing hooks run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from zoo import registry
from zoo.blocks.auxiliary import AuxCollector
from zoo.model.block import Block
from zoo.model.config import ModelConfig, MTPConfig
from zoo.registry import BlockContext


class MTPModule(nn.Module):
    """Depth ``k`` of multi-token prediction (DeepSeek-V3 Eq. 21-22, or one Gloeckle et al. head).

    ``forward(h_prev (B, T, d), token_embeddings (B, T, d) | None, aux, state) -> h^k (B, T, d)``, the
    block output *before* the final ``norm``; the caller applies ``norm`` and the shared head.
    """

    def __init__(self, config: ModelConfig, ctx: BlockContext, sequential: bool):
        super().__init__()
        model, mtp = config, config.mtp
        norm = model.norm
        if sequential:
            self.embed_norm = registry.build("norm", norm.type, norm.options, ctx)
            self.hidden_norm = registry.build("norm", norm.type, norm.options, ctx)
            self.proj = nn.Linear(2 * model.d_model, model.d_model, bias=False)  # M_k of Eq. 21
        self.sequential = sequential
        self.init_std = ctx.init_std
        self.block = Block(config, ctx, mtp.mixer or model.mixer, mtp.ffn or model.ffn)
        self.norm = registry.build("norm", norm.type, norm.options, ctx)

    def init_own_weights(self) -> None:
        if self.sequential:
            nn.init.normal_(self.proj.weight, std=self.init_std)

    def forward(self, h_prev: torch.Tensor, token_embeddings: torch.Tensor | None, aux: AuxCollector,
                state=None) -> torch.Tensor:
        x = h_prev
        if self.sequential:  # embedding first, as in the released DeepSeek-V3 weights
            x = self.proj(torch.cat([self.embed_norm(token_embeddings), self.hidden_norm(h_prev)], dim=-1))
        return self.block(x, aux, state)


class MultiTokenPrediction(nn.Module):
    """The ``D`` MTP modules of a model (``config.model.mtp``) and their loss (DeepSeek-V3 Eq. 24-25).

    ``modules[k - 1]`` is depth ``k``: its output at position ``i`` is scored against token ``i + k + 1``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        mtp = config.mtp
        self.config: MTPConfig = mtp
        self.sequential = mtp.heads == "sequential"
        self.layers = nn.ModuleList(MTPModule(config, config.context(config.n_layers + k), self.sequential)
                                    for k in range(mtp.depth))

    @property
    def depth(self) -> int:
        return len(self.layers)

    def step(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor | None, embed: nn.Module,
             aux: AuxCollector, state=None) -> torch.Tensor:
        """Depth ``k`` (1-based) over positions whose depth-``k-1`` hidden states are ``h_prev (B, T, d)``;
        ``next_ids (B, T)`` are the tokens ``t_{i+k}`` (ignored by parallel heads, which read the trunk)."""
        module = self.layers[k - 1]
        return module(h_prev, embed(next_ids) if module.sequential else None, aux, state)

    def loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, embed: nn.Module,
             head_loss: Callable[..., torch.Tensor], aux: AuxCollector) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(lambda / D * sum_k CE_k, [CE_1, ..., CE_D])`` from the main model's pre-norm hidden states
        ``h (B, T, d)``; depth ``k`` runs over positions ``0 .. T-k-1`` and is scored on ``labels[i+k+1]``
        (``-100`` ignored) by the shared head, ``head_loss(hidden, labels, shift)`` (the model's
        :meth:`~zoo.model.decoder.ZooModel.head_loss`). Depths with no position left to score (``T <= k + 1``)
        contribute 0."""
        T = input_ids.shape[1]
        ces, h_prev = [], h
        for k in range(1, self.depth + 1):
            if T - k < 2:
                ces.append(h.new_zeros((), dtype=torch.float32))
                continue
            trunk = h_prev if self.sequential else h
            h_k = self.step(k, trunk[:, :T - k], input_ids[:, k:], embed, aux)  # (B, T-k, d)
            ces.append(head_loss(self.layers[k - 1].norm(h_k), labels, k + 1))  # position i predicts t_{i+k+1}
            h_prev = h_k
        return self.config.loss_weight / self.depth * sum(ces), ces
