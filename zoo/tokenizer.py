"""The byte-level tokenizer: 256 byte ids plus ``<|endoftext|>`` (id 256); needs no training."""

from __future__ import annotations


class ByteTokenizer:
    eot_token = "<|endoftext|>"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")
