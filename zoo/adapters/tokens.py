"""Trainable token rows: the embedding (and output) rows of chosen token ids train beside an adapter while the
rest of the base stays frozen (peft's ``trainable_token_indices``).

A vocabulary grown for new special tokens (the chat markers of SFT) starts the new rows at the mean of the old
ones (Hewitt 2021); under a frozen base they would stay there, every marker embedded and predicted alike. With
``trainable_tokens: [ids]`` the adapter holds ``token_rows (n, d)``, initialised from the base's rows of those
ids, that replace them: in the input embedding and, for the logits, in the output head (the same parameter
when the embeddings are tied, its own when not). The base tensors are never written; disabling the adapter
gives the base rows back, and merging copies the trained rows into the weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters.base import AdapterModule, adopt
from zoo.errors import ConfigError


def check_token_ids(ids: Sequence[int], key: str = "trainable_tokens") -> None:
    """ConfigError unless ``ids`` are distinct non-negative integers."""
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ConfigError(f"{key} must be a list of token ids (integers >= 0), got {list(ids)!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key} lists an id twice: {list(ids)!r}")


class TokenEmbedding(nn.Embedding, AdapterModule):
    """An ``nn.Embedding`` whose rows for ``token_ids`` are the trainable ``token_rows (n, d)``; its ``weight``
    is the frozen base's own tensor. ``forward(ids (...)) -> (..., d)``."""

    ADAPTER_PARAMETERS = ("token_rows",)

    @classmethod
    def wrap(cls, embedding: nn.Embedding, token_ids: Sequence[int]) -> "TokenEmbedding":
        module = adopt(cls, embedding)
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=embedding.weight.device)
        slots = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        slots[ids] = torch.arange(len(ids), device=ids.device)  # vocabulary id -> row of token_rows, -1 if none
        module.register_buffer("token_ids", ids, persistent=False)
        module.register_buffer("token_slots", slots, persistent=False)
        module.token_rows = nn.Parameter(embedding.weight.detach()[ids].clone())
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)  # (..., d) from the frozen weight
        if not self.adapter_enabled:
            return out
        slot = self.token_slots[input_ids]
        rows = self.token_rows.to(out.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    def merged(self) -> nn.Embedding:
        with torch.device("meta"):
            embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx)
        weight = self.weight.detach().index_copy(0, self.token_ids, self.token_rows.detach().to(self.weight.dtype))
        embedding.weight = nn.Parameter(weight)
        return embedding


class TokenHead(nn.Linear, AdapterModule):
    """An output ``nn.Linear`` whose logits for ``token_ids`` come from trained rows: its own ``token_rows``
    (untied head), or those of the :class:`TokenEmbedding` it is tied to. ``forward(h (..., d)) -> (..., V)``."""

    ADAPTER_PARAMETERS = ("token_rows",)

    @classmethod
    def wrap(cls, head: nn.Linear, token_ids: Sequence[int], tied: TokenEmbedding | None) -> "TokenHead":
        module = adopt(cls, head)
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=head.weight.device)
        module.register_buffer("token_ids", ids, persistent=False)
        if tied is None:
            module.token_rows = nn.Parameter(head.weight.detach()[ids].clone())
        else:  # not a child module: the rows are the embedding's, saved once under its name
            module.__dict__["tied_embedding"] = tied
        return module

    def rows(self) -> torch.Tensor:
        """The trained rows ``(n, d)`` of the head."""
        tied = self.__dict__.get("tied_embedding")
        return self.token_rows if tied is None else tied.token_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)  # (..., V)
        if not self.adapter_enabled:
            return logits
        trained = F.linear(hidden, self.rows().to(hidden.dtype))  # (..., n)
        if self.bias is not None:
            trained = trained + self.bias[self.token_ids]
        return logits.index_copy(-1, self.token_ids, trained.to(logits.dtype))

    def merged(self) -> nn.Linear:
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        weight = self.weight.detach().index_copy(0, self.token_ids, self.rows().detach().to(self.weight.dtype))
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear


def train_token_rows(model: nn.Module, token_ids: Sequence[int]) -> None:
    """Make the embedding and output rows of ``token_ids`` trainable in ``model`` (its ``embed`` and ``head``;
    the base stays frozen), in place."""
    vocab = model.embed.num_embeddings
    if too_large := [i for i in token_ids if i >= vocab]:
        raise ConfigError(f"model.adapter.trainable_tokens: ids {too_large} are not below the model's vocab_size "
                          f"{vocab}")
    tied = model.head.weight is model.embed.weight
    model.embed = TokenEmbedding.wrap(model.embed, token_ids)
    model.head = TokenHead.wrap(model.head, token_ids, model.embed if tied else None)
