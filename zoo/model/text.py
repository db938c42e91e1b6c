"""Text in, text out: prompts are encoded with the model's tokenizer, left-padded into one batch, decoded by
:func:`zoo.model.generation.decode_steps`, and the new tokens are turned back into text piece by piece.

A tokenizer here is anything with ``encode(str) -> list[int]``, ``decode(ids) -> str`` and ``eot_id`` (the
end-of-text token that ends generation; :mod:`zoo.tokenizer`'s classes). Pieces are cut so that no multi-byte
UTF-8 character is split (a decode ending in U+FFFD waits for the next token) and no stop string is half
emitted (text that could still grow into a stop string is held back until it cannot). A stop may also be a
token id, which ends the text as the end-of-text token does (a chat model's end-of-turn marker, a special
token that decoding leaves out of the text, so no stop string could see it).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from zoo.model.generation import decode_steps

_INCOMPLETE = "\ufffd"  # what a decode of a cut multi-byte character ends with


class TextStream:
    """One row's generated text, fed token by token: :meth:`add` returns the text now safe to show."""

    def __init__(self, tokenizer, stop: Sequence[str | int]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if isinstance(s, str)]
        self.end_ids = {tokenizer.eot_id, *(s for s in stop if not isinstance(s, str))}
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.text = ""
        self.done = False

    def add(self, token: int) -> str:
        """Take the next generated token; returns the new piece (possibly empty). Ends the stream at the end
        of text, a stop token or the first stop string (which is left out)."""
        if token in self.end_ids:
            return self.finish()
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.finish()
        if self.text.endswith(_INCOMPLETE):
            return ""
        safe = len(self.text) - _partial_stop(self.text, self.stop)
        piece = self.text[self.shown:safe]
        self.shown = max(self.shown, safe)
        return piece

    def finish(self) -> str:
        """End the stream; returns whatever was held back."""
        self.done = True
        piece = self.text[self.shown:]
        self.shown = len(self.text)
        return piece


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _check(tokenizer, stop) -> list[str]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (set model.tokenizer, e.g. zoo.tokenizer.ByteTokenizer(), "
                         "or load a checkpoint that holds a tokenizer.json)")
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    if any(not (isinstance(s, str) and s or type(s) is int and s >= 0) for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings and token ids (int >= 0), got {stop!r}")
    return stop


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, attention_mask)`` of ``prompts``, each ``(B, T)``; an empty prompt is the
    end-of-text token alone (a document boundary, as in training)."""
    encoded = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), tokenizer.eot_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, T - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[row, T - len(e):] = 1
    return ids.to(device), mask.to(device)


def stream_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, stop: Sequence[str] = (),
                **decoding) -> Iterator[list[str]]:
    """Yield, after each decoding step, the new text piece of every prompt (``""`` where none, and for rows
    already ended), until every row has ended (end of text, a stop string, or ``max_new_tokens``).
    ``decoding``: the options of :func:`zoo.model.generation.decode_steps`."""
    stop = _check(tokenizer, stop)
    ids, mask = encode_prompts(tokenizer, prompts, model.embed.weight.device)
    rows = [TextStream(tokenizer, stop) for _ in prompts]
    steps = decode_steps(model, ids, max_new_tokens, attention_mask=mask, **decoding)
    for tokens in steps:
        yield [("" if row.done else row.add(int(t))) for row, t in zip(rows, tokens.tolist())]
        if all(row.done for row in rows):
            steps.close()
            return
    yield [row.finish() for row in rows]


def generate_text(model, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 64,
                  stop: Sequence[str] = (), stream: bool = False, **decoding):
    """The continuation of ``prompt`` (a str) or of each prompt of a list (batched, left-padded), without the
    prompt, the end-of-text token or the stop (string or token id) that ended it. ``stream=True`` (one prompt)
    returns an iterator of text pieces instead, which join to the same text."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
    stop = _check(tokenizer, stop)
    if stream:
        if not single:
            raise ValueError("stream=True takes one prompt (a str); decode a list of prompts without streaming")
        return (pieces[0] for pieces in stream_text(model, tokenizer, prompts, max_new_tokens, stop, **decoding)
                if pieces[0])
    texts = [""] * len(prompts)
    for pieces in stream_text(model, tokenizer, prompts, max_new_tokens, stop, **decoding):
        texts = [text + piece for text, piece in zip(texts, pieces)]
    return texts[0] if single else texts
