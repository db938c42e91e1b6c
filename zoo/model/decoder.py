"""ZooModel: the one decoder skeleton every preset builds.

``embed -> n_layers x Block(norm, mixer, norm, ffn) -> norm -> head`` with pre-norm residual blocks
(GPT-2, Radford et al. 2019 §2.3). Mixer and FFN of each layer come from the registry by name.
With ``model.mtp`` set, multi-token prediction modules (:mod:`zoo.model.mtp`, DeepSeek-V3 §2.2) read
the last hidden state before the final norm and add ``mtp_loss`` when labels are given.

The model is built from its :class:`~zoo.model.config.ModelConfig` alone. Constructing it allocates the
parameters; :func:`zoo.model.build.build_model` then initialises them and applies the converters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zoo import registry
from zoo.adapters import merge_adapter
from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.state import DecodingState
from zoo.errors import ConfigError
from zoo.model.block import Block
from zoo.model.config import ModelConfig
from zoo.model.generation import generate
from zoo.model.losses import linear_cross_entropy, shifted_cross_entropy
from zoo.model.mtp import MultiTokenPrediction
from zoo.model.speculative import generate_speculative
from zoo.model.text import generate_text
from zoo.registry import BlockContext


@dataclass
class ZooOutput:
    """What ``ZooModel.forward`` returns; losses are None where they do not apply."""

    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss + mtp_loss (those present)
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    router_stats: list[torch.Tensor] = field(default_factory=list)  # per MoE layer: (n_experts,) counts
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # aux_loss by name, summed over layers
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # block diagnostics (mean over layers),
    # and mtp_ce_{k}: the cross-entropy of MTP depth k (DeepSeek-V3 Eq. 24)


class ZooModel(nn.Module):
    """A decoder-only language model assembled from a :class:`~zoo.model.config.ModelConfig`.

    ``forward(input_ids (B, T), labels (B, T) | None) -> ZooOutput``. Labels are aligned with the
    inputs (the model shifts them: position t is scored on ``labels[t + 1]``); ``-100`` is ignored.
    ``self.mtp`` holds the multi-token prediction modules (None without ``model.mtp``); they run only
    when labels are given (training, validation) or when :meth:`generate` drafts with them.
    ``self.tokenizer`` is the model's tokenizer (:mod:`zoo.tokenizer`), or None when it is unknown: checkpoints
    that hold a ``tokenizer.json`` set it on load, and :meth:`generate_text` needs it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"ZooModel is built from a ModelConfig (a config's model section), got "
                            f"{type(config).__name__}; zoo.build_model takes a whole run config too")
        if config.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it, or let train.py take it from the tokenizer")
        self.config = config
        # Given its weight, nn.Embedding skips its own N(0, 1) init: the init pass draws the weights.
        self.embed = nn.Embedding(config.vocab_size, config.d_model,
                                  _weight=torch.empty(config.vocab_size, config.d_model))
        self.blocks = nn.ModuleList(Block(config, config.context(i)) for i in range(config.n_layers))
        self.norm = registry.build("norm", config.norm.type, config.norm.options, config.context(config.n_layers))
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = MultiTokenPrediction(config) if config.mtp is not None else None
        self.adapter_base = None  # where the frozen base of an adapter came from (zoo.adapters.add_adapter)
        self.tokenizer = None  # what generate_text encodes with; set by from_pretrained from tokenizer.json
        self.prompt = None  # prompt tuning's virtual tokens (zoo.adapters.prompt.PromptEmbeddings), None without

    def tie_weights(self) -> None:
        """Make the output head share the embedding's weight when ``config.tie_embeddings`` is set (again
        after anything that replaced either tensor, such as ``to_empty`` or ``load_state_dict(assign=True)``)."""
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_own_weights(self) -> None:
        """The embedding and an untied head from ``N(0, init_std)``; the blocks fill their own."""
        nn.init.normal_(self.embed.weight, std=self.config.init_std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=self.config.init_std)

    def hidden_states(self, input_ids: torch.Tensor, aux: AuxCollector, states=None) -> torch.Tensor:
        """The final-norm input ``(B, T, d_model)``; ``states`` is a list of per-layer decoding states.
        ``self.prompt`` (prompt tuning) may prepend virtual tokens to a new sequence's embeddings; their
        outputs are dropped here, so the result is aligned with ``input_ids``."""
        x = self.embed(input_ids)
        if self.prompt is not None:
            x = self.prompt(x, states)
        n_virtual = x.shape[1] - input_ids.shape[1]
        for i, block in enumerate(self.blocks):
            x = block(x, aux, states[i] if states is not None else None)
        return x[:, n_virtual:]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, states=None,
                return_logits: bool = True) -> ZooOutput:
        """``return_logits=False`` (with labels; what training runs) leaves ``logits`` None and scores the
        head through :func:`zoo.model.losses.linear_cross_entropy`, which never holds the whole logits."""
        if labels is None and not return_logits:
            raise ValueError("return_logits=False needs labels: without them the logits are the only output")
        aux = AuxCollector()
        h = self.hidden_states(input_ids, aux, states)
        h_out = self.norm(h)
        logits = self.head(h_out) if return_logits else None
        mtp_loss = mtp_metrics = None
        if labels is not None and self.mtp is not None:  # MTP MoE layers report after the main ones
            mtp_loss, ces = self.mtp.loss(h, input_ids, labels, self.embed, self.head_loss, aux)
            mtp_metrics = {f"mtp_ce_{k}": ce.detach() for k, ce in enumerate(ces, start=1)}
        out = ZooOutput(logits=logits, router_stats=aux.router_stats, aux_losses=aux.losses,
                        metrics={k: torch.stack(v).mean() for k, v in aux.metrics.items()})
        out.metrics.update(mtp_metrics or {})
        if labels is not None:  # position t scored on labels[t + 1]
            out.lm_loss = self.head_loss(h_out, labels) if logits is None else shifted_cross_entropy(logits, labels)
            out.aux_loss = aux.total_loss()
            out.mtp_loss = mtp_loss
            out.loss = sum(x for x in (out.aux_loss, out.mtp_loss) if x is not None) + out.lm_loss
        aux.close()  # a checkpointed block recomputed in backward reports nothing, counts nothing twice
        return out

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, shift: int = 1) -> torch.Tensor:
        """Cross-entropy of the output head on normalised ``hidden (B, T, d)``, position t scored on
        ``labels[t + shift]``; fused with the head's matmul when the head is a plain bias-free linear."""
        if type(self.head) is nn.Linear and self.head.bias is None:
            return linear_cross_entropy(hidden, self.head.weight, labels, shift)
        return shifted_cross_entropy(self.head(hidden), labels, shift)

    def drop_mtp(self) -> "ZooModel":
        """Remove the multi-token prediction modules (DeepSeek-V3 §2.2: "directly discard the MTP modules"
        at inference); the model's config becomes a copy without ``mtp``, so it saves and serves as a plain
        model. The main logits are unchanged. Returns ``self``."""
        self.mtp = None
        self.config = self.config.without_mtp()
        return self

    def init_states(self, batch_size: int, max_len: int, blocks=None,
                    left_pad: torch.Tensor | None = None) -> list[DecodingState]:
        """Fresh per-layer decoding states (KV caches, recurrent states) for ``max_len`` positions, of
        the main model's blocks or of ``blocks`` (e.g. the MTP modules' blocks); ``left_pad (B,)``: the
        number of leading pad positions of each row (see :class:`~zoo.blocks.state.DecodingState`). Decoding relies on the
        :class:`~zoo.blocks.state.DecodingState` protocol alone, so a mixer whose ``init_state`` returns
        anything else is a ``TypeError`` here rather than a failure midway through decoding."""
        param = self.embed.weight
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else param.dtype
        if param.is_cuda and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        if blocks is None and self.prompt is not None:  # room for prompt tuning's virtual tokens
            max_len += self.prompt.n_tokens
        blocks = self.blocks if blocks is None else blocks
        states = [block.mixer.init_state(batch_size, max_len, param.device, dtype) for block in blocks]
        for block, state in zip(blocks, states):
            if not isinstance(state, DecodingState):
                raise TypeError(f"{type(block.mixer).__name__}.init_state returned a {type(state).__name__}, "
                                f"not a zoo.blocks.state.DecodingState (see the mixer contract in zoo.blocks)")
            state.left_pad = left_pad if left_pad is not None and bool(left_pad.any()) else None
        return states

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, speculative: str | None = None,
                 return_stats: bool = False, attention_mask: torch.Tensor | None = None,
                 repetition_penalty: float | None = None):
        """Continue ``input_ids (B, T)`` by up to ``max_new_tokens``; see :func:`zoo.model.generation.generate`.
        ``attention_mask (B, T)``: 0 at left padding (prompts of different lengths in one batch; each row
        decodes as it would alone). ``repetition_penalty``: CTRL's (Keskar et al. 2019, §4.1), as transformers'.

        ``speculative="mtp"``: self-speculative decoding, the MTP modules drafting and the main model
        verifying (:func:`zoo.model.speculative.generate_speculative`): greedy gives plain greedy's tokens, and
        sampling follows the speculative sampling rule, so the output distribution is plain decoding's.
        ``return_stats=True`` returns ``(ids, stats)`` (acceptance rate, drafted, accepted, passes).
        Decoding runs in eval mode (dropless experts, no load counts for the balancing bias); every
        module's mode is restored afterwards."""
        if speculative is None:
            ids = generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                           attention_mask, repetition_penalty)
            stats = {"forward_passes": ids.shape[1] - input_ids.shape[1]}
        elif speculative == "mtp":
            if repetition_penalty not in (None, 1.0):
                raise ValueError("speculative='mtp' does not apply a repetition_penalty: leave it None, or decode "
                                 "without speculative")
            ids, stats = generate_speculative(self, input_ids, max_new_tokens, eos_token_id, temperature, top_k,
                                              top_p, generator, attention_mask)
        else:
            raise ValueError(f"speculative={speculative!r}; choose None (plain decoding) or 'mtp'")
        return (ids, stats) if return_stats else ids

    def generate_text(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, stop=(), repetition_penalty: float | None = None,
                      stream: bool = False, generator: torch.Generator | None = None):
        """Text in, text out with ``self.tokenizer``: the continuation of ``prompt`` (a str), or a list of
        continuations of a list of prompts (decoded as one left-padded batch, each as if alone), ending at
        the end-of-text token, the first of the ``stop`` strings or token ids (left out) or ``max_new_tokens``.
        ``stream=True`` returns an iterator of text pieces (never a split UTF-8 character). Sampling options
        as :meth:`generate`; see :func:`zoo.model.text.generate_text`."""
        return generate_text(self, self.tokenizer, prompt, max_new_tokens, stop, stream, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=generator, repetition_penalty=repetition_penalty)

    # The checkpoint layer sits above the model (it builds models to load them): these two conveniences of
    # the public API reach up to it when called.
    def save_pretrained(self, path, **kwargs):
        """Write a checkpoint directory (``config.json`` + safetensors); see
        :func:`zoo.checkpoint.pretrained.save_pretrained`."""
        from zoo.checkpoint.pretrained import save_pretrained

        return save_pretrained(self, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload a checkpoint to the Hugging Face Hub; see :func:`zoo.checkpoint.pretrained.push_to_hub`."""
        from zoo.checkpoint.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def num_parameters(self, active: bool = False, trainable: bool = False) -> int:
        """Total parameters (tied weights once); ``active=True`` counts what one token uses, i.e.
        routed experts only for the experts a token is sent to (blocks define ``num_active_parameters``);
        ``trainable=True`` counts only parameters with ``requires_grad`` (an adapter's, its base frozen)."""
        if trainable:
            if active:
                raise ValueError("num_parameters: choose active=True or trainable=True, not both")
            return sum(p.numel() for p in self.parameters() if p.requires_grad)
        if not active:
            return sum(p.numel() for p in self.parameters())
        return _active_parameters(self, set())

    def merge_adapter(self) -> "ZooModel":
        """Fold a LoRA / DoRA adapter into the weights (NF4 bases dequantised first): returns this model,
        now plain (``config.adapter`` None, every parameter trainable), with the same logits; see
        :func:`zoo.adapters.merge_adapter`."""
        return merge_adapter(self)


def _active_parameters(module: nn.Module, seen: set) -> int:
    if hasattr(module, "num_active_parameters"):
        seen.update(id(p) for p in module.parameters())
        return module.num_active_parameters()
    total = 0
    for p in module.parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total + sum(_active_parameters(child, seen) for child in module.children())
