"""Tokenizers: bytes (no training), byte-level BPE trained with the ``tokenizers`` library, or a file.

Every tokenizer here has ``vocab_size``, ``eot_id`` (the ``<|endoftext|>`` id that separates
documents), ``encode``/``encode_batch``/``decode``, and ``to_json()``: a ``tokenizer.json`` that the
``tokenizers`` library (and so ``transformers``' fast tokenizers) loads and that encodes as this one does.

Chat template (zoo's, for SFT and DPO): each message is ``<|{role}|>\n{content}<|end|>\n`` with role
``system``, ``user`` or ``assistant``; a generation prompt is ``<|assistant|>\n``. The four role and end
markers are special tokens (one id each), added to the vocabulary by :func:`with_chat_tokens`. The template
travels with a checkpoint as ``chat_template`` (a Jinja string, the form ``transformers``'
``apply_chat_template`` renders identically) in ``tokenizer_config.json`` beside ``tokenizer.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOT_TOKEN = "<|endoftext|>"
# End-of-text names used by common tokenizer.json files, tried in order when loading one.
_EOT_NAMES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")

CHAT_ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*(f"<|{role}|>" for role in CHAT_ROLES), END_OF_TURN)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
                 "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
TOKENIZER_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: the chat template, as transformers reads it


class ChatTemplate:
    """``apply_chat_template`` for the tokenizers below: ``chat_template`` (a Jinja string, zoo's
    :data:`CHAT_TEMPLATE` or one a loaded checkpoint brought) is None until :func:`with_chat_tokens` gives
    a tokenizer zoo's."""

    chat_template: str | None = None
    end_of_turn_id: int | None = None  # the token a chat reply ends with (zoo's <|end|>), None when unknown

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """``messages`` (``[{"role": ..., "content": ...}]``) rendered by ``chat_template``, with the prompt
        for an assistant reply appended when ``add_generation_prompt``: token ids, or the text with
        ``tokenize=False`` (the arguments and defaults of ``transformers``' method of this name)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; zoo.tokenizer.with_chat_tokens(tokenizer) "
                             "adds zoo's (the sft and dpo objectives do)")
        if self.chat_template == CHAT_TEMPLATE:
            _check_messages(messages)
        text = _compiled(self.chat_template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                    eos_token=self.eot_token, bos_token="")
        return self.encode(text) if tokenize else text

    def tokenizer_config(self) -> str | None:
        """The ``tokenizer_config.json`` that carries the chat template (None without one)."""
        if self.chat_template is None:
            return None
        return json.dumps({"chat_template": self.chat_template, "eos_token": END_OF_TURN,
                           "pad_token": self.eot_token, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)


@lru_cache(maxsize=8)
def _compiled(template: str):
    """A Jinja template compiled in a sandbox (templates come with downloaded checkpoints), as transformers does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, "
                             f"got {m!r}")


class ByteTokenizer(ChatTemplate):
    """UTF-8 bytes as ids 0-255, plus ``<|endoftext|>`` = 256 (vocab 257).

    ``to_json()`` writes the same map as a ``tokenizers`` byte-level BPE without merges: it encodes
    any text to the same ids, except that it reads a literal ``<|endoftext|>`` in the text as the
    special token (id 256), where this class sees its 13 bytes.
    """

    eot_token = EOT_TOKEN
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOT_TOKEN])
        return tok.to_str()


class HFTokenizer(ChatTemplate):
    """A ``tokenizers.Tokenizer`` (BPE trained here, or any ``tokenizer.json``) with its end-of-text id."""

    def __init__(self, tokenizer, source: str = "tokenizer", chat_template: str | None = None,
                 end_of_turn: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.end_of_turn_id = tokenizer.token_to_id(end_of_turn) if end_of_turn else None
        ids = [tokenizer.token_to_id(name) for name in _EOT_NAMES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{source} has none of the end-of-text tokens {', '.join(_EOT_NAMES)}; "
                             "add one as a special token")
        self.eot_id = found[0]
        self.eot_token = tokenizer.id_to_token(self.eot_id)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """The ``tokenizer.json`` at ``path``, with the ``chat_template`` of a ``tokenizer_config.json``
        beside it (as a checkpoint holds them) and its ``eos_token`` as the end of a chat turn."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        config_path = path.with_name(TOKENIZER_CONFIG)
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template, end = config.get("chat_template"), config.get("eos_token")
        end = end.get("content") if isinstance(end, dict) else end  # transformers' AddedToken form
        return cls(Tokenizer.from_file(str(path)), source=str(path),
                   chat_template=template if isinstance(template, str) else None,
                   end_of_turn=end if isinstance(end, str) and template is not None else None)

    @classmethod
    def from_str(cls, text: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def with_chat_tokens(tokenizer) -> HFTokenizer:
    """``tokenizer`` with zoo's chat markers (:data:`CHAT_TOKENS`) as special tokens and :data:`CHAT_TEMPLATE`.

    Markers it lacks get the next ids, after its vocabulary; a byte tokenizer becomes the equivalent
    ``tokenizers`` one first. One that has a chat template already is returned as it is."""
    if tokenizer.chat_template is not None:
        return tokenizer
    from tokenizers import Tokenizer

    inner = Tokenizer.from_str(tokenizer.to_json())
    inner.add_special_tokens(list(CHAT_TOKENS))
    return HFTokenizer(inner, source="chat tokenizer", chat_template=CHAT_TEMPLATE, end_of_turn=END_OF_TURN)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style, Radford et al. 2019 §2.2; Sennrich et al. 2016) of ``vocab_size``
    ids including the 256 byte symbols and ``<|endoftext|>``, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"bpe vocab_size must be >= 257 (256 bytes + {EOT_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, source="trained BPE")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level pre-tokenizers: printable Latin-1
    bytes map to themselves, the other 68 to characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping

