"""Tokenizers: bytes (no training), byte-level BPE trained with the ``tokenizers`` library, or a file.

Every tokenizer here has ``vocab_size``, ``eot_id`` (the ``<|endoftext|>`` id that separates
documents), ``encode``/``encode_batch``/``decode``, and ``to_json()``: a ``tokenizer.json`` that the
``tokenizers`` library (and so ``transformers``' fast tokenizers) loads and that encodes as this one does.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOT_TOKEN = "<|endoftext|>"
# End-of-text names used by common tokenizer.json files, tried in order when loading one.
_EOT_NAMES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class ByteTokenizer:
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


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (BPE trained here, or any ``tokenizer.json``) with its end-of-text id."""

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
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
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls(Tokenizer.from_file(str(path)), source=str(path))

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

