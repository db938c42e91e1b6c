"""zoo models inside transformers: a ``PreTrainedModel`` and ``PretrainedConfig`` for the model type ``zoo``,
registered with transformers' Auto classes (as flash-linear-attention registers its models).

Any zoo model, RetNet, hybrids and Switch included, exported with ``zoo.export(model, path, format="zoo")``
loads with ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and works where transformers models
work: ``generate`` (its sampling, stopping and streaming), pipelines, PEFT adapters on the zoo linears
(``qkv``, ``out``, ``gate_up``, ``down``, ``proj``), lm-eval's ``hf`` model, the ``Trainer``.

``ZooForCausalLM.model`` is the :class:`~zoo.ZooModel`; ``forward`` takes transformers' arguments and
returns a ``CausalLMOutputWithPast`` (labels as in transformers: aligned with the inputs, shifted inside,
-100 ignored; the loss is zoo's total, with its balancing and MTP terms). Decoding is incremental:
:class:`ZooCache` is a transformers ``Cache`` holding each layer's zoo
:class:`~zoo.blocks.state.DecodingState` (KV caches, MLA latents, retention's recurrent state), which each
forward pass advances, so ``generate`` feeds one new token per step as zoo's own ``generate`` does.
``attention_mask`` may mark left padding (batches of prompts of different lengths, as transformers' batched
``generate``, pipelines with ``batch_size`` and lm-eval's ``hf`` model make them): the decoding states are
told each row's padding (:class:`~zoo.blocks.state.DecodingState`'s ``left_pad``), so every mixer keeps the
pads out and each row reads and decodes as it would alone. Right padding is accepted where it changes
nothing (a cache-less pass: causal positions never see later pads).

Two seams serve the trainers. ``base_model`` is a :class:`ZooBackbone`, the model without its head: transformers'
``(input_ids, attention_mask) -> last_hidden_state`` contract, which TRL's ``SFTTrainer`` calls to score the head
in chunks (its fused log-probabilities). ``gradient_checkpointing=True`` (``activation_checkpointing_enable``)
recomputes each decoder block in backward with :func:`zoo.train.block_wrappers.recomputed`, so the router still
counts each token once. :class:`ZooTrainerCallback` gives transformers' ``Trainer`` (and TRL's) what zoo's
trainer does after each optimizer step: the loss-free router bias update (:meth:`zoo.blocks.router.Router.
on_optimizer_step`). A trainer other than zoo's scores what its loss says: TRL's fused head scores the
language-model cross-entropy only (no balancing or MTP term).

This module imports transformers; :mod:`zoo.interop.registration` imports it when transformers is imported.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel,
                          TrainerCallback)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.state import DecodingState
from zoo.checkpoint.importers import native
from zoo.model import ModelConfig, ZooModel
from zoo.model.generation import left_padding
from zoo.train.block_wrappers import decoder_blocks, recomputed, unwrap_blocks
from zoo.train.metrics import all_reduce_sum

# transformers 5.2x names the decoding cache ``cache``; earlier versions ``past_key_values``.
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class ZooConfig(PretrainedConfig):
    """The transformers config of a zoo model: the zoo model config under ``zoo_config`` (validated), and the
    sizes transformers and its tools read (``vocab_size``, ``hidden_size``, ``max_position_embeddings``, ...)."""

    model_type = native.MODEL_TYPE

    def __init__(self, zoo_config: dict | None = None, **kwargs):
        self.zoo_config = dict(zoo_config or {})
        if self.zoo_config:
            model = ModelConfig.from_dict(self.zoo_config)
            for key, value in (("vocab_size", model.vocab_size), ("hidden_size", model.d_model),
                               ("num_hidden_layers", model.n_layers), ("max_position_embeddings", model.max_seq_len),
                               ("tie_word_embeddings", model.tie_embeddings)):
                kwargs[key] = value
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.zoo_config)


class ZooCache(Cache):
    """The zoo decoding states of one ``generate`` call, one per layer, as a transformers ``Cache``.

    ``length`` positions have been fed (the same in every layer). ``crop`` drops the last positions where
    every state can rewind (KV caches), for transformers' assisted decoding; beam search's reordering is
    not supported (a recurrent state has no per-position entries to reorder)."""

    def __init__(self, states: list[DecodingState]):
        super().__init__(layers=[])
        self.states = states

    @property
    def length(self) -> int:
        return self.states[0].length if self.states else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.length + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return all(state.can_rewind for state in self.states)

    def crop(self, tokens_to_remove: int) -> None:
        for state in self.states:
            state.rewind(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("zoo decoding states cannot be reordered for beam search: use num_beams=1 "
                                  "(greedy or sampling)")

    def reset(self):
        raise NotImplementedError("a ZooCache is made for one generate call: start a new one")


class ZooForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~zoo.ZooModel` (``self.model``) as a transformers causal LM; see the module docstring."""

    config_class = ZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    supports_gradient_checkpointing = True

    def __init__(self, config: ZooConfig):
        super().__init__(config)
        self.model = ZooModel(config.model_config)
        self._decode_length = 0  # positions the states of the running generate call must hold
        self.gradient_checkpointing = False  # what transformers' is_activation_checkpointing reads
        self.post_init()

    @property
    def base_model(self) -> "ZooBackbone":
        """The model without its output head (transformers' base model: ``last_hidden_state`` out)."""
        return ZooBackbone(self.model)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """transformers' activation-checkpointing hook: every ``every_n_layers``-th decoder block (MTP blocks
        included) recomputed through ``gradient_checkpointing_func`` in backward; ``enable=False`` undoes it."""
        unwrap_blocks(self.model)
        self.gradient_checkpointing = enable
        if enable:
            for i, block in enumerate(decoder_blocks(self.model)):
                if i % every_n_layers == 0:
                    block.forward = functools.partial(recomputed, block.forward, gradient_checkpointing_func)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """zoo's init (:func:`zoo.model.build.init_weights`) one module at a time: each fills its own tensors."""
        if hasattr(module, "init_own_weights"):
            module.init_own_weights()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build its DynamicCache: prepare_inputs_for_generation builds a ZooCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        self._decode_length = generation_config.max_length or 0
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      use_cache: bool = True, **kwargs) -> dict:
        """The next forward's inputs: with a cache (made here on the first step, sized for the call's
        ``max_length``, holding the prompts' left padding), only the tokens it has not seen."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if use_cache and cache is None:
            capacity = max(self._decode_length, input_ids.shape[1] + 1)
            pad = left_padding(attention_mask, input_ids)
            cache = ZooCache(self.model.init_states(input_ids.shape[0], capacity, left_pad=pad))
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, _CACHE: cache, "use_cache": use_cache}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """``input_ids (B, T)`` -> logits ``(B, T, vocab)``, the loss with ``labels``, and the advanced cache
        (``cache`` / ``past_key_values``, a :class:`ZooCache`) when one is passed. ``attention_mask``
        (0 at pads) may mark left padding (each row then reads as it would alone; with a cache it must be the
        padding the cache was made with, over the cached and the new positions) or, without a cache, right
        padding; any other mask raises ValueError."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        out = self.model(input_ids, labels=labels, states=_decoding_states(self.model, input_ids, attention_mask, cache))
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE: cache})


class ZooBackbone(nn.Module):
    """A :class:`~zoo.ZooModel` without its output head, as transformers' base models are called:
    ``(input_ids, attention_mask=None) -> BaseModelOutputWithPast(last_hidden_state)``, the final norm's output
    ``(B, T, d_model)`` that the head (``get_output_embeddings()``) turns into logits. A view made on each
    access of :attr:`ZooForCausalLM.base_model`: it holds no weights of its own."""

    def __init__(self, model: ZooModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``attention_mask`` as in :meth:`ZooForCausalLM.forward` (no cache here). ``position_ids`` other than
        each row's ``0, 1, ...`` (packed or padding-free batches) raise ValueError: zoo's mixers take none."""
        if position_ids is not None and not torch.equal(position_ids, _default_positions(input_ids, position_ids)):
            raise ValueError("zoo models take no position_ids: pack sequences off (TRL: packing=False, "
                             "padding_free=False) so every row starts at position 0")
        aux = AuxCollector()
        hidden = self.model.hidden_states(input_ids, aux, _decoding_states(self.model, input_ids, attention_mask))
        aux.close()
        return BaseModelOutputWithPast(last_hidden_state=self.model.norm(hidden))


class ZooTrainerCallback(TrainerCallback):
    """Pass to a transformers ``Trainer`` (TRL's too: ``callbacks=[ZooTrainerCallback()]``) training a zoo model:
    after each optimizer step, every module with an ``on_optimizer_step(all_reduce)`` hook runs it, as zoo's
    trainer does, so the loss-free router bias moves by ``gamma * sign(mean load - load)`` (Wang et al. 2024,
    Algorithm 1), from the loads summed over the data-parallel ranks."""

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        # The modules with the hook (state counted in forward, e.g. MoE loads), found once per training run.
        self._stepping = [m for m in (model.modules() if model is not None else ())
                          if callable(getattr(m, "on_optimizer_step", None))]

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        for module in self._stepping:
            module.on_optimizer_step(all_reduce_sum)


def _default_positions(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=position_ids.device).expand_as(position_ids)


def _decoding_states(model: ZooModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     cache: "ZooCache | None" = None) -> list[DecodingState] | None:
    """The decoding states a forward pass over ``input_ids`` runs with: the cache's (its padding checked against
    ``attention_mask``); fresh ones that know a left-padded mask's pads, as a prefill would; or None (no mask, or
    right padding without a cache, which causal positions never see)."""
    if cache is not None and not isinstance(cache, ZooCache):
        raise TypeError(f"a zoo model decodes with its own ZooCache, got a {type(cache).__name__}")
    if cache is not None:
        if attention_mask is not None:
            _check_cache_padding(attention_mask, cache, input_ids.shape[1])
        return cache.states
    if attention_mask is None or _right_padded(attention_mask):
        return None
    pad = left_padding(attention_mask, input_ids)
    return model.init_states(input_ids.shape[0], input_ids.shape[1], left_pad=pad)


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of ``attention_mask`` is ones then zeros (no padding at all included)."""
    return bool((attention_mask.cummin(dim=-1).values == attention_mask).all())


def _check_cache_padding(attention_mask: torch.Tensor, cache: ZooCache, new: int) -> None:
    """``attention_mask`` must cover the ``cache.length`` cached and ``new`` fed positions and mark the padding
    the cache's states were made with, and nothing else."""
    end = cache.length + new
    expected = cache.states[0].real_keys(end) if cache.states else None
    if expected is None:  # no padding
        expected = torch.ones(attention_mask.shape[0], end, dtype=torch.bool, device=attention_mask.device)
    if attention_mask.shape != expected.shape or not torch.equal(attention_mask.bool(), expected):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must mark the left padding the decoding cache "
                         f"was made with over its {cache.length} cached and {new} new positions: pad prompts on the "
                         "left only (a cache cannot take padding in the middle or on the right)")


def register() -> None:
    """Register the ``zoo`` model type with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    AutoConfig.register(native.MODEL_TYPE, ZooConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)


register()
