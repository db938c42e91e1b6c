"""Self-speculative decoding with a model's multi-token prediction modules as drafters (DeepSeek-V3, arXiv
2412.19437 §5.4.3; draft-then-verify, Leviathan et al. 2023, §2.3; Chen et al. 2023, Algorithm 2).

The MTP modules draft ``D`` tokens, the main model scores the last committed token and the drafts in one
forward pass, and each draft is accepted or replaced by the speculative sampling rule, so the output has
exactly the distribution of plain decoding with the same options:

* sampling (``temperature > 0``): draft ``d ~ q`` (the MTP head's distribution after temperature, top-k and
  top-p) is accepted with probability ``min(1, p(d) / q(d))`` (``p``: the main model's, processed alike);
  the first rejected draft is replaced by a draw from ``norm(max(0, p - q))``, and when every draft is
  accepted a bonus token is drawn from ``p`` at the next position;
* greedy (``temperature = 0``): ``p`` and ``q`` are one-hot, so a draft is kept when it is the main model's
  argmax and replaced by that argmax otherwise: the output is plain greedy decoding's token for token (in
  exact arithmetic; a batched verification pass rounds differently from one-token steps, which can only
  matter for near-ties in low precision).

Rows of a batch verify independently but commit the same number of tokens, the fewest any row accepted plus
one, so that every decoding state keeps one length: a row that accepted more commits its next accepted draft
in place of its replacement. Truncating a row at a point chosen by the other rows' (independent) draws
leaves each committed token distributed as in plain decoding, so the rule stays exact for every row.
Left-padded prompts (``attention_mask``) are handled by the decoding states as in
:mod:`zoo.model.generation`.
"""

from __future__ import annotations

import torch

from zoo.blocks.auxiliary import AuxCollector
from zoo.blocks.state import DecodingState
from zoo.model.generation import check_sampling, eval_mode, left_padding, sampling_probs


def _discarding_aux() -> AuxCollector:
    """A closed collector: it keeps nothing (decoding makes many passes and needs no losses or counts)."""
    aux = AuxCollector()
    aux.close()
    return aux


class _Sampler:
    """Draws drafts and applies the acceptance rule for one set of sampling options."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, generator):
        check_sampling(temperature, top_k, top_p)
        self.greedy = temperature == 0.0
        self.options = (temperature, top_k, top_p)
        self.generator = generator

    def draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens (B,), q (B, V) or None when greedy)`` from draft logits ``(B, V)``."""
        if self.greedy:
            return logits.argmax(-1), None
        q = sampling_probs(logits, *self.options)
        return torch.multinomial(q, 1, generator=self.generator)[:, 0], q

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, q: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Main-model ``logits (B, n+1, V)`` at the last committed token and the ``n`` drafts ``(B, n)``
        (with their draft distributions ``q``, one ``(B, V)`` per draft): returns ``accepted (B,)``, each row's
        count of leading accepted drafts, and ``replacement (B,)``, the token each row emits after them."""
        B, n = drafts.shape
        rows = torch.arange(B, device=drafts.device)
        if self.greedy:
            target = logits.argmax(-1)  # (B, n+1)
            ok = target[:, :n] == drafts
        else:
            p = sampling_probs(logits, *self.options)  # (B, n+1, V)
            q_all = torch.stack(q, dim=1) if n else p[:, :0]  # (B, n, V)
            p_d = p[:, :n].gather(-1, drafts[..., None])[..., 0]
            q_d = q_all.gather(-1, drafts[..., None])[..., 0]
            u = torch.rand(B, n, generator=self.generator, device=logits.device)
            ok = u * q_d < p_d  # u < p/q, without dividing (q_d > 0: the draft was drawn from q)
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,)
        if self.greedy:
            return accepted, target[rows, accepted]
        residual = p[rows, accepted]  # (B, V): p at the first rejection, or the bonus position
        rejected = accepted < n
        if bool(rejected.any()):
            q_rej = q_all[rows, accepted.clamp(max=n - 1)]
            fixed = (residual - q_rej).clamp(min=0)
            # p == q exactly leaves nothing to reject from; keep p there (the draft was then always accepted).
            fixed = torch.where(fixed.sum(-1, keepdim=True) > 0, fixed, residual)
            residual = torch.where(rejected[:, None], fixed, residual)
        return accepted, torch.multinomial(residual, 1, generator=self.generator)[:, 0]


@torch.no_grad()
def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int = 64, eos_token_id: int | None = None,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Decode ``input_ids (B, T)`` with drafts from ``model.mtp`` verified by the main model.

    Returns ``(ids (B, T + n), stats)``, ``n <= max_new_tokens``, distributed as plain
    :func:`zoo.model.generation.generate`'s (greedy: equal to them); rows that emitted ``eos_token_id``
    are padded with it. ``stats``: ``drafted`` and ``accepted`` draft tokens (summed over rows; accepted =
    drafts committed), ``acceptance_rate``, ``forward_passes`` (main-model passes that emit tokens: the
    prefill and each verification; plain decoding needs one per token), ``rollback_passes`` (extra passes
    re-feeding accepted tokens into states that cannot rewind, e.g. retention's), ``tokens_per_pass``.

    Bookkeeping, with ``N`` committed tokens ``x_0..x_{N-1}``: the main model has processed ``x_0..x_{N-2}``
    and its pre-norm hidden states ``h^0_i`` are kept; depth ``k`` of the MTP chain at position ``i``
    reads ``h^{k-1}_i`` and token ``x_{i+k}`` and predicts ``x_{i+k+1}`` (so draft ``d_k`` of ``x_{N-1+k}``
    comes from position ``N-2``). Positions of depth ``k`` up to ``N-1-k`` read committed tokens only and
    stay in its decoding state; the later ``k-1`` read drafts and are discarded after verification by
    restoring the snapshot taken before them. Rejected positions of the main model are rewound when every
    main state ``can_rewind`` (KV caches); otherwise every state is restored to its snapshot from before
    verification and fed the accepted tokens again (recurrent states, alone or in a hybrid).
    """
    mtp = model.mtp
    if mtp is None:
        raise ValueError("speculative='mtp' needs multi-token prediction modules: this model has none "
                         "(its config has no model.mtp, or drop_mtp() removed them)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampler = _Sampler(temperature, top_k, top_p, generator)
    pad = left_padding(attention_mask, input_ids)
    with eval_mode(model):
        return _decode(model, input_ids, max_new_tokens, eos_token_id, sampler, pad)


def _decode(model, input_ids, max_new_tokens, eos_token_id, sampler: _Sampler, pad):
    mtp = model.mtp
    stats = {"drafted": 0, "accepted": 0, "forward_passes": 0, "rollback_passes": 0}
    (B, T), D = input_ids.shape, mtp.depth
    capacity = T + max_new_tokens + D + 1
    seq = input_ids.new_zeros(B, capacity)  # committed tokens, then this step's drafts
    seq[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    aux = _discarding_aux()
    main_states = model.init_states(B, capacity, left_pad=pad)
    mtp_states = model.init_states(B, capacity, [module.block for module in mtp.layers], left_pad=pad)
    done = [0] * (D + 1)  # done[k]: positions held in depth k's state (k >= 1)
    n_new = 0
    if max_new_tokens > 0:
        h = model.hidden_states(input_ids, aux, main_states)  # (B, T, d)
        hidden = [h.new_zeros(B, capacity, h.shape[-1]) for _ in range(D + 1)]  # h^k_i by position i
        hidden[0][:, :T] = h
        empty = torch.zeros(B, 0, dtype=seq.dtype, device=seq.device)
        seq[:, T] = sampler.verify(model.head(model.norm(h[:, -1:])), empty, [])[1]
        stats["forward_passes"] += 1
        n_new = 1
        finished = _finish(seq[:, T:T + 1], finished, eos_token_id)
    N = T + n_new
    while n_new < max_new_tokens and not bool(finished.all()):
        n_draft = min(D, max_new_tokens - n_new - 1)
        drafted = [_draft(model, k, N, seq, hidden, mtp_states[k - 1], done, aux, sampler)
                   for k in range(1, n_draft + 1)]
        marks, q = [m for m, _ in drafted], [dist for _, dist in drafted]
        # Verify x_{N-1}, d_1..d_n at positions N-1..N-1+n in one pass.
        main_marks = [state.snapshot() for state in main_states]
        h = model.hidden_states(seq[:, N - 1:N + n_draft], aux, main_states)  # (B, n+1, d)
        row_accepted, replacement = sampler.verify(model.head(model.norm(h)), seq[:, N:N + n_draft], q)
        stats["forward_passes"] += 1
        accepted = int(row_accepted.min())  # every row commits accepted + 1 tokens
        seq[:, N + accepted] = torch.where(row_accepted == accepted, replacement, seq[:, N + accepted])
        hidden[0][:, N - 1:N + accepted] = h[:, :accepted + 1]
        if accepted < n_draft:
            if all(state.can_rewind for state in main_states):
                for state in main_states:
                    state.rewind(n_draft - accepted)
            else:  # restore, then feed the accepted tokens again
                for state, mark in zip(main_states, main_marks):
                    state.restore(mark)
                hidden[0][:, N - 1:N + accepted] = model.hidden_states(seq[:, N - 1:N + accepted], aux, main_states)
                stats["rollback_passes"] += 1
        for k, mark in enumerate(marks, start=1):
            mtp_states[k - 1].restore(mark)
        stats["drafted"] += n_draft * B
        stats["accepted"] += int(torch.minimum(row_accepted, torch.tensor(accepted + 1)).sum())
        new = seq[:, N:N + accepted + 1]
        was_finished = finished
        finished = _finish(new, finished, eos_token_id)
        emitted = accepted + 1
        if bool(finished.all()):  # stop right after the last row's end of text, as plain decoding does
            first_eos = torch.where(was_finished, 0, (new == eos_token_id).long().argmax(dim=1) + 1)
            emitted = int(first_eos.max())
        N += emitted
        n_new += emitted
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    stats["tokens_per_pass"] = n_new / stats["forward_passes"] if stats["forward_passes"] else 0.0
    return seq[:, :N].clone(), stats


def _finish(new: torch.Tensor, finished: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Overwrite with ``eos_token_id`` the tokens of ``new (B, n)`` (a view into the sequence) of rows already
    finished or after a row's first end of text; return the rows finished after them."""
    if eos_token_id is None:
        return finished
    after = (new == eos_token_id).long().cumsum(dim=1) - (new == eos_token_id).long() > 0
    new.masked_fill_(finished[:, None] | after, eos_token_id)
    return finished | (new == eos_token_id).any(dim=1)


def _draft(model, k: int, N: int, seq: torch.Tensor, hidden: list, state: DecodingState, done: list, aux,
           sampler: _Sampler):
    """Advance MTP depth ``k`` to position ``N-2`` and write its draft of ``x_{N-1+k}`` into ``seq``.

    Positions up to ``N-1-k`` (all, for parallel heads) read committed tokens and are kept; later ones
    read drafts. Returns the state's snapshot taken between the two, to restore after verification, and the
    draft distribution ``q (B, V)`` (None when greedy)."""
    mtp = model.mtp
    last = N - 2
    certain = last if not mtp.sequential else min(last, N - 1 - k)
    mark = None
    for start, end in ((done[k], certain), (max(done[k], certain + 1), last)):
        if end >= start:
            trunk = hidden[k - 1] if mtp.sequential else hidden[0]
            hidden[k][:, start:end + 1] = mtp.step(k, trunk[:, start:end + 1], seq[:, start + k:end + k + 1],
                                                   model.embed, aux, state)
        if mark is None:
            done[k] = max(done[k], certain + 1)
            mark = state.snapshot()
    seq[:, N - 1 + k], q = sampler.draft(model.head(mtp.layers[k - 1].norm(hidden[k][:, last])))
    return mark, q
