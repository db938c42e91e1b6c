"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2-3).

``n_tokens`` learned embeddings ``P_e (n, d_model)`` are prepended to the embedded input, ``[P_e; X_e]``
(§2), and run through the frozen model like ordinary tokens; the model's outputs at the virtual positions are
dropped, so logits and labels keep their ``(B, T)`` shape and positions. The model calls the module on every
forward (``ZooModel.prompt``): it prepends only when a new sequence starts (no decoding states, or states that
have seen nothing yet), so in generation the virtual tokens prefill the decoding states once, ahead of the
prompt. Initialisation (§3.2): ``vocab`` copies the embeddings of tokens sampled from the vocabulary (the paper
samples the 5,000 most common tokens; zoo samples uniformly, having no token frequencies), ``text`` those of the
ids ``init_ids`` (the tokens of a text, e.g. a task description, repeated to ``n_tokens``), ``random`` draws
from ``U(-0.5, 0.5)`` as the paper's random baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoo.adapters.base import AdapterModule, freeze
from zoo.errors import ConfigError, require_positive
from zoo.registry import register

Init = Literal["vocab", "text", "random"]


@dataclass
class PromptTuningConfig:
    """``model.adapter: {type: prompt_tuning, ...}``."""

    n_tokens: int = 20  # virtual tokens prepended to every sequence (Lester et al. §3.2 use 1-150; 20 in most runs)
    init: Init = "vocab"  # vocab: embeddings of sampled vocabulary tokens; text: of init_ids; random: U(-0.5, 0.5)
    init_ids: list[int] | None = None  # token ids for init: text (repeated or cut to n_tokens)

    def validate(self) -> None:
        require_positive(self, "n_tokens")
        validate_init(self.init, self.init_ids)


def validate_init(init: str, init_ids: list[int] | None) -> None:
    """The ``init``/``init_ids`` pair of a virtual-token adapter (prompt or prefix tuning); the schema has
    checked ``init`` against :data:`Init`."""
    if init == "text" and not init_ids:
        raise ConfigError("init: text needs init_ids, the token ids of the text (e.g. tokenizer.encode('Answer:'))")
    if init != "text" and init_ids is not None:
        raise ConfigError(f"init_ids is only read with init: text (init is {init!r})")
    if init_ids is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in init_ids):
        raise ConfigError(f"init_ids must be non-negative token ids, got {init_ids}")


def init_token_ids(init: str, init_ids: list[int] | None, n_tokens: int, vocab_size: int) -> torch.Tensor:
    """``(n_tokens,)`` ids whose embeddings (or activations) initialise virtual tokens: sampled uniformly from
    the vocabulary (``vocab``, torch's global generator) or ``init_ids`` repeated and cut (``text``)."""
    if init == "vocab":
        return torch.randint(0, vocab_size, (n_tokens,))
    if max(init_ids) >= vocab_size:
        raise ConfigError(f"model.adapter.init_ids: {max(init_ids)} is no token id of a vocabulary of {vocab_size}")
    return torch.tensor(init_ids).repeat(-(-n_tokens // len(init_ids)))[:n_tokens]


class PromptEmbeddings(AdapterModule):
    """The learned prompt ``prompt_embeddings (n_tokens, d_model)`` (Lester et al. §2). ``forward(x (B, T, d),
    states) -> (B, n + T, d)`` at the start of a sequence (``states`` None or fresh), ``x`` itself otherwise or
    when the adapter is off; the model drops the outputs of the extra leading positions."""

    ADAPTER_PARAMETERS = ("prompt_",)

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(embeddings)

    @property
    def n_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def forward(self, x: torch.Tensor, states=None) -> torch.Tensor:
        if not self.adapter_enabled or (states is not None and states[0].length > 0):
            return x
        prompt = self.prompt_embeddings.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((prompt, x), dim=1)


@register("adapter", "prompt_tuning", config=PromptTuningConfig)
class PromptTuning:
    """The ``prompt_tuning`` adapter: freezes the model and sets ``model.prompt`` to a
    :class:`PromptEmbeddings` initialised as the config says (Lester et al. §3.2)."""

    def __init__(self, config: PromptTuningConfig):
        self.config = config

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        table = model.embed.weight
        n, init = self.config.n_tokens, self.config.init
        if init == "random":
            embeddings = torch.empty(n, table.shape[1], dtype=table.dtype, device=table.device).uniform_(-0.5, 0.5)
        else:
            ids = init_token_ids(init, self.config.init_ids, n, table.shape[0]).to(table.device)
            embeddings = table.detach()[ids].clone()
        model.prompt = PromptEmbeddings(embeddings)
        return model
