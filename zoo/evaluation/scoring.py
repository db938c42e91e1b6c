"""Log-likelihoods of text under a zoo model, batched: what lm-evaluation-harness requests
(continuation scores, rolling document scores) and perplexity per token and per byte.

Per-token perplexity depends on the tokenizer (a byte model predicts more, easier tokens than a BPE model);
bits per byte, ``-sum log2 p / n_bytes`` over the UTF-8 bytes of the text, does not, so it compares models
with different tokenizers (as in Gao et al. 2020, "The Pile", §4, which reports bits per UTF-8 byte).
A document is scored from an end-of-text token, the document boundary the models were trained with, in
windows of at most ``max_seq_len`` tokens; each window after the first keeps the tokens before it as context
so that every token is predicted exactly once with as much context as fits (lm-eval's rolling windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from zoo.model.generation import eval_mode


@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                        max_len: int | None = None) -> list[tuple[float, bool]]:
    """For each ``(context ids, continuation ids)`` (context non-empty), ``(log p(continuation | context),
    whether greedy decoding would produce the continuation)``; inputs longer than ``max_len`` (default
    ``model.config.max_seq_len``) lose their oldest context tokens. Runs in batches of ``batch_size``,
    right-padded (causal: a pad after a sequence changes none of its logits)."""
    max_len = max_len or model.config.max_seq_len
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs, targets = [], []
        for context, continuation in chunk:
            if not context or not continuation:
                raise ValueError("score_continuations needs a non-empty context and continuation")
            full = (context + continuation)[-(max_len + 1):]
            inputs.append(full[:-1])
            targets.append(full[-len(continuation):])
        logprobs = _log_softmax_batch(model, inputs)
        for row, (ids, target) in enumerate(zip(inputs, targets)):
            end = len(ids)
            lp = logprobs[row, end - len(target):end]  # (n, V): positions predicting the continuation
            target_t = torch.tensor(target, device=lp.device)
            results.append((float(lp.gather(-1, target_t[:, None]).sum()), bool((lp.argmax(-1) == target_t).all())))
    return results


@torch.no_grad()
def score_document(model, ids: list[int], prefix_id: int, batch_size: int = 8, max_len: int | None = None) -> float:
    """``log p(ids)`` of a whole document, each token predicted once: the first from ``prefix_id`` (the
    end-of-text token), in windows of at most ``max_len`` tokens with the preceding tokens as context."""
    max_len = max_len or model.config.max_seq_len
    pairs, tokens = [], [prefix_id, *ids]
    for start in range(0, len(ids), max_len):
        end = min(start + max_len, len(ids))  # predict ids[start:end] = tokens[start + 1:end + 1]
        context_start = max(0, end - max_len)
        pairs.append((tokens[context_start:start + 1], tokens[start + 1:end + 1]))
    return sum(lp for lp, _ in score_continuations(model, pairs, batch_size, max_len))


@dataclass
class Perplexity:
    """Totals over the scored documents and the figures derived from them."""

    nll: float  # -sum log p, nats
    tokens: int
    bytes: int
    documents: int

    @property
    def per_token(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def per_byte(self) -> float:
        return 2 ** self.bits_per_byte

    def to_dict(self) -> dict:
        return {"perplexity_per_token": self.per_token, "perplexity_per_byte": self.per_byte,
                "bits_per_byte": self.bits_per_byte, "nll_nats": self.nll, "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents}


def perplexity(model, tokenizer, documents: Sequence[str], batch_size: int = 8) -> Perplexity:
    """Perplexity per token and per byte (and bits per byte) of ``documents`` (empty ones skipped)."""
    nll, tokens, n_bytes, n_docs = 0.0, 0, 0, 0
    with eval_mode(model):
        for text in documents:
            ids = tokenizer.encode(text)
            if not ids:
                continue
            nll -= score_document(model, ids, tokenizer.eot_id, batch_size)
            tokens, n_bytes, n_docs = tokens + len(ids), n_bytes + len(text.encode("utf-8")), n_docs + 1
    if not tokens:
        raise ValueError("perplexity: every document is empty")
    return Perplexity(nll, tokens, n_bytes, n_docs)


def _log_softmax_batch(model, inputs: list[list[int]]) -> torch.Tensor:
    """``(B, T, V)`` float32 log-probabilities of right-padded ``inputs`` (eval mode)."""
    T = max(len(ids) for ids in inputs)
    device = model.embed.weight.device
    batch = torch.zeros(len(inputs), T, dtype=torch.long, device=device)
    for row, ids in enumerate(inputs):
        batch[row, :len(ids)] = torch.tensor(ids, device=device)
    with eval_mode(model):
        return model(batch).logits.float().log_softmax(-1)
