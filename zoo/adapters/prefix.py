"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning", §4.2; deep prompts of P-Tuning v2, Liu et al. 2022, §3):
learned keys and values that every position of every layer attends to, ahead of the real tokens.

Each main-layer mixer is replaced by a subclass (its tensors shared, see :func:`zoo.adapters.base.adopt`) whose
decoding state starts out holding the prefix, through the hook of the mixer contract (:mod:`zoo.blocks`): a
mixer treats positions its state already holds as any earlier positions. ``init_state`` returns that prefilled
state, and ``forward(x)`` without a state runs as ``forward(x, <a prefilled state>)``; nothing inside the mixers
changes. Per mixer:

* attention: ``prefix_key, prefix_value (n_kv_heads, n, head_dim)``, one prefix per K/V head (GQA: the query
  heads of a group share it, as they share the group's keys). The prefix keys are stored *post-RoPE*, as a KV
  cache stores keys (and as ``peft`` passes prefixes in ``past_key_values``): they carry no position of their
  own, and the real tokens take positions ``n..n+T-1``. Scores depend only on position differences (RoPE, Su
  et al. 2021, Eq. 34), so real-to-real attention is the base's; and since the rotation of a key at a fixed
  position is a bijection, a free post-RoPE key covers every key a virtual token at any position could have.
* MLA: the prefix lives where MLA caches (DeepSeek-V2 §2.1.2): ``prefix_latent (n, kv_lora_rank)`` (a
  post-norm ``c_KV``) and ``prefix_rope_key (n, qk_rope_head_dim)`` (post-RoPE, shared by the heads). The prefix
  keys and values are then ``W_UK c`` and ``W_UV c``, of the same form as every real token's, the one-token
  decoding step keeps its absorbed form, and the prefix costs ``n (d_c + d_R)`` numbers per layer instead of
  ``n H (d_h + d_R + d_v)`` for decompressed K/V.
* retention: a learned initial recurrent state ``prefix_state (H, Dk, Dv)``. Retention from ``S_0`` computes
  ``o_t = q_t (gamma^(t+1) S_0) + sum_{m<=t} gamma^(t-m) (q_t . k_m) v_m`` (:mod:`zoo.blocks.retention_ops`), and
  a prefix of tokens ``(k_i, v_i)``, ``i = 0..n-1``, placed before the input contributes
  ``sum_i gamma^(t+n-i) (q_t . k_i) v_i`` to ``o_t``, which is the same with
  ``S_0 = sum_i gamma^(n-1-i) k_i^T v_i``, the state after the prefix (Sun et al. 2023, Eq. 6). Prefixes are
  thus exactly the states that are sums of at most ``n`` decayed rank-one terms; from ``n >= Dk`` on, every
  ``S_0`` is one, so learning ``S_0`` directly is the prefix idea at its full capacity, for ``Dk Dv`` numbers
  per head whatever ``n``. The prefix's weight in ``o_t`` decays as ``gamma^t`` along the sequence, as a
  prefix's would in retention (unlike attention's, which the softmax renormalises).

``reparam: true`` trains the prefixes through Li & Liang's reparameterisation (§4.2): ``P = MLP(P')``, a
shared two-layer tanh MLP from ``P' (n, d_model)`` to every layer's prefix activations (per virtual token:
keys and values, latents and rope keys, or, for retention, a key and a value per head folded into ``S_0`` by
the sum above); :func:`fold_reparam` then stores the plain prefixes and drops the MLP, for saving and
inference. ``init: vocab`` sets plain prefixes to the base model's own keys/values (and states) of tokens
sampled from the vocabulary (``text``: of ``init_ids``), the initialisation with real-word activations of Li &
Liang §7.2; with ``reparam`` it sets ``P'`` to those tokens' embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.adapters.base import AdapterModule, adapter_modules, adopt, freeze
from zoo.adapters.prompt import Init, init_token_ids, validate_init
from zoo.blocks.attention import Attention
from zoo.blocks.mla import MultiHeadLatentAttention
from zoo.blocks.retention import MultiScaleRetention, RetentionState
from zoo.blocks.retention_ops import state_dtype
from zoo.errors import ConfigError, require_positive
from zoo.registry import register


@dataclass
class PrefixTuningConfig:
    """``model.adapter: {type: prefix_tuning, ...}``."""

    n_tokens: int = 16  # prefix length per layer (Li & Liang: 10 for table-to-text, 200 for summarisation)
    reparam: bool = False  # train through P = MLP(P') (Li & Liang §4.2); fold_reparam stores plain prefixes
    reparam_hidden: int = 512  # the MLP's hidden width (Li & Liang: 512)
    init: Init = "vocab"  # vocab: the base's activations of sampled tokens; text: of init_ids; random: N(0, init_std)
    init_ids: list[int] | None = None  # token ids for init: text

    def validate(self) -> None:
        require_positive(self, "n_tokens", "reparam_hidden")
        validate_init(self.init, self.init_ids)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the mixer's keys come out in for input ``x`` (autocast's, where it is on)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class PrefixMixer(AdapterModule):
    """What the prefixed mixers share: their decoding state starts out holding the prefix. A subclass names its
    plain prefix parameters (``PREFIXES``), the per-virtual-token activations the reparameterisation produces
    (``token_shapes``), how those become the prefix (``from_tokens``) and how to read a prefix from a state
    the base mixer filled (``from_state``) and to prefill one (``prefill``)."""

    ADAPTER_PARAMETERS = ("prefix_",)
    PREFIXES: tuple[str, ...] = ()

    def token_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def from_tokens(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_state(self, state) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prefill(self, state, prefixes: dict[str, torch.Tensor], batch_size: int, dtype: torch.dtype):
        raise NotImplementedError

    def room(self) -> int:
        """Positions the prefix takes in the decoding state."""
        return self.n_prefix

    def prefixes(self) -> dict[str, torch.Tensor]:
        """The plain prefix tensors: the parameters, or the reparameterisation's output for this layer."""
        source = self.__dict__.get("prefix_source")
        if source is not None:
            encoder, index = source
            return self.from_tokens(encoder.layer_tokens(index, self.token_shapes()))
        return {name: getattr(self, name) for name in self.PREFIXES}

    def prefilled_state(self, batch_size: int, max_len: int, device, dtype):
        """The base mixer's decoding state with room for ``max_len`` positions after the prefix, holding it."""
        state = super().init_state(batch_size, max_len + self.room(), device, dtype)
        return self.prefill(state, self.prefixes(), batch_size, dtype)

    def init_state(self, batch_size: int, max_len: int, device, dtype):
        if not self.adapter_enabled:
            return super().init_state(batch_size, max_len, device, dtype)
        return self.prefilled_state(batch_size, max_len, device, dtype)

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        if self.adapter_enabled and state is None:
            state = self.prefilled_state(x.shape[0], x.shape[1], x.device, compute_dtype(x))
        return super().forward(x, state)


class PrefixAttention(PrefixMixer, Attention):
    """GQA attention whose KV cache starts with ``prefix_key, prefix_value (n_kv_heads, n, head_dim)``
    (post-RoPE)."""

    PREFIXES = ("prefix_key", "prefix_value")

    def token_shapes(self):
        return {name: (self.n_kv_heads, self.head_dim) for name in self.PREFIXES}

    def from_tokens(self, tokens):
        return {name: t.transpose(0, 1) for name, t in tokens.items()}  # (n, Hkv, D) -> (Hkv, n, D)

    def from_state(self, state):
        return {"prefix_key": state.k[0, :, :state.length], "prefix_value": state.v[0, :, :state.length]}

    def prefill(self, state, prefixes, batch_size, dtype):
        key, value = (prefixes[n].to(dtype).expand(batch_size, -1, -1, -1) for n in self.PREFIXES)
        state.append(key, value)
        return state


class PrefixMLA(PrefixMixer, MultiHeadLatentAttention):
    """MLA whose cache starts with ``prefix_latent (n, kv_lora_rank)`` and ``prefix_rope_key (n, rope_dim)``."""

    PREFIXES = ("prefix_latent", "prefix_rope_key")

    def token_shapes(self):
        return {"prefix_latent": (self.kv_lora_rank,), "prefix_rope_key": (self.rope_dim,)}

    def from_tokens(self, tokens):
        return tokens

    def from_state(self, state):
        return {"prefix_latent": state.latent[0, :state.length], "prefix_rope_key": state.k_rope[0, :state.length]}

    def prefill(self, state, prefixes, batch_size, dtype):
        latent, rope_key = (prefixes[n].to(dtype).expand(batch_size, -1, -1) for n in self.PREFIXES)
        state.append(latent, rope_key)
        return state


def prefix_initial_state(keys: torch.Tensor, values: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """``S_0 = sum_i gamma^(n-1-i) k_i^T v_i`` per head: the retention state after a prefix of ``keys (n, H, Dk)``
    and ``values (n, H, Dv)`` (Sun et al. 2023, Eq. 6, from a zero state); ``(H, Dk, Dv)``."""
    n = keys.shape[0]
    decay = torch.exp(log_gamma.to(keys.dtype)[None, :] * torch.arange(n - 1, -1, -1, dtype=keys.dtype,
                                                                         device=keys.device)[:, None])  # (n, H)
    return torch.einsum("nh,nhk,nhv->hkv", decay, keys, values)


class InitialStateRetention(PrefixMixer, MultiScaleRetention):
    """Retention started from a learned recurrent state ``prefix_state (H, Dk, Dv)`` instead of zero: the
    prefix-tuning form of RetNet (the module docstring derives the equivalence)."""

    PREFIXES = ("prefix_state",)

    def room(self) -> int:  # the recurrent state does not grow with positions
        return 0

    def token_shapes(self):
        return {"key": (self.n_heads, self.key_dim), "value": (self.n_heads, self.value_dim)}

    def from_tokens(self, tokens):
        log_gamma = torch.tensor(self.log_decays, dtype=torch.float64, device=tokens["key"].device)
        return {"prefix_state": prefix_initial_state(tokens["key"], tokens["value"], log_gamma)}

    def from_state(self, state):
        return {"prefix_state": state.recurrent[0]}

    def prefill(self, state, prefixes, batch_size, dtype):
        initial = prefixes["prefix_state"].to(state_dtype(dtype))
        return RetentionState(initial.expand(batch_size, -1, -1, -1), state.length)


PREFIXED = {Attention: PrefixAttention, MultiHeadLatentAttention: PrefixMLA,
            MultiScaleRetention: InitialStateRetention}


class PrefixEncoder(AdapterModule):
    """Li & Liang's reparameterisation (§4.2): ``P[i] = MLP(P'[i])`` with ``P' = prefix_embedding (n, d)`` and
    the MLP ``W2 tanh(W1 p + b1) + b2`` (``prefix_w1 (h, d)``, ``prefix_w2 (sum of layer sizes, h)``) producing
    every layer's per-token prefix activations, layer ``l`` reading its rows of ``W2``."""

    ADAPTER_PARAMETERS = ("prefix_",)

    def __init__(self, embedding: torch.Tensor, hidden: int, sizes: list[int]):
        super().__init__()
        like = {"dtype": embedding.dtype, "device": embedding.device}
        first = nn.Linear(embedding.shape[1], hidden, **like)  # nn.Linear's Kaiming-uniform init, as Li & Liang's
        second = nn.Linear(hidden, sum(sizes), **like)
        self.prefix_embedding = nn.Parameter(embedding)
        self.prefix_w1, self.prefix_b1 = nn.Parameter(first.weight.detach()), nn.Parameter(first.bias.detach())
        self.prefix_w2, self.prefix_b2 = nn.Parameter(second.weight.detach()), nn.Parameter(second.bias.detach())
        self.offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()

    def layer_tokens(self, index: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Layer ``index``'s activations per virtual token, split by ``shapes``: ``{name: (n, *shape)}``."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        hidden = torch.tanh(F.linear(self.prefix_embedding, self.prefix_w1, self.prefix_b1))
        flat = F.linear(hidden, self.prefix_w2[start:stop], self.prefix_b2[start:stop])  # (n, size)
        sizes = [int(torch.tensor(s).prod()) for s in shapes.values()]
        return {name: part.reshape(-1, *shape) for (name, shape), part in zip(shapes.items(), flat.split(sizes, -1))}


def _base_prefixes(model: nn.Module, ids: torch.Tensor) -> list:
    """Every main-layer mixer's state after the base model read ``ids (n,)`` (Li & Liang §7.2's real-word
    activations), in evaluation mode; each module's mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        states = model.init_states(1, ids.shape[0])
        with torch.no_grad():
            model(ids[None], states=states)
    finally:
        for module, training in modes:
            module.training = training
    return states


@register("adapter", "prefix_tuning", config=PrefixTuningConfig)
class PrefixTuning:
    """The ``prefix_tuning`` adapter: freezes the model and prefixes every main-layer mixer (attention, MLA,
    retention; the MTP modules' blocks are left alone), with ``reparam`` adding ``model.prefix_encoder``."""

    def __init__(self, config: PrefixTuningConfig):
        self.config = config

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        unsupported = sorted({type(b.mixer).__name__ for b in model.blocks if type(b.mixer) not in PREFIXED})
        if unsupported:
            raise ConfigError(f"model.adapter: prefix_tuning prefixes attention, mla and retention mixers; this "
                              f"model has {unsupported}")
        n, config = self.config.n_tokens, self.config
        weight = model.embed.weight
        ids = None if config.init == "random" else init_token_ids(config.init, config.init_ids, n, weight.shape[0])
        states = _base_prefixes(model, ids.to(weight.device)) if ids is not None and not config.reparam else None
        mixers = []
        for i, block in enumerate(model.blocks):
            mixer = adopt(PREFIXED[type(block.mixer)], block.mixer)
            mixer.n_prefix = n
            mixers.append(mixer)
        if config.reparam:
            embedding = (weight.detach()[ids.to(weight.device)].clone() if ids is not None else
                         torch.randn(n, weight.shape[1], dtype=weight.dtype, device=weight.device) * model.config.init_std)
            sizes = [sum(int(torch.tensor(s).prod()) for s in m.token_shapes().values()) for m in mixers]
            model.prefix_encoder = PrefixEncoder(embedding, config.reparam_hidden, sizes)
        for i, (block, mixer) in enumerate(zip(model.blocks, mixers)):
            if config.reparam:
                mixer.__dict__["prefix_source"] = (model.prefix_encoder, i)
            else:
                plain = mixer.from_state(states[i]) if states is not None else self._random(mixer, model)
                for name, tensor in plain.items():
                    setattr(mixer, name, nn.Parameter(tensor.detach().to(weight.dtype).clone()))
            block.mixer = mixer
        return model

    def _random(self, mixer: PrefixMixer, model: nn.Module) -> dict[str, torch.Tensor]:
        """``N(0, init_std)`` prefixes in the shapes the mixer's plain prefixes have."""
        weight = model.embed.weight
        tokens = {name: torch.randn(self.config.n_tokens, *shape, dtype=weight.dtype, device=weight.device)
                  * model.config.init_std for name, shape in mixer.token_shapes().items()}
        return mixer.from_tokens(tokens)


def fold_reparam(model: nn.Module) -> nn.Module:
    """Replace the reparameterisation ``P = MLP(P')`` of a ``prefix_tuning`` adapter by the prefixes it computes
    now (Li & Liang §4.2: after training only the prefix is kept): each mixer gets plain prefix parameters,
    ``model.prefix_encoder`` goes, and the config records ``reparam: false``. Same logits; returns the model."""
    spec = model.config.adapter
    if spec is None or spec.type != "prefix_tuning" or not spec.options.reparam:
        raise ValueError("fold_reparam applies to a model with a prefix_tuning adapter trained with reparam: true")
    for _, module in list(adapter_modules(model)):
        if isinstance(module, PrefixMixer):
            with torch.no_grad():
                plain = module.prefixes()
            del module.__dict__["prefix_source"]
            for name, tensor in plain.items():
                setattr(module, name, nn.Parameter(tensor.detach().clone()))
    del model.prefix_encoder
    options = dataclasses.replace(spec.options, reparam=False)
    model.config = dataclasses.replace(model.config, adapter=dataclasses.replace(spec, options=options))
    return model
