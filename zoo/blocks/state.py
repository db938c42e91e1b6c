"""The decoding state protocol: what every mixer's ``init_state`` returns and what decoders rely on.

A decoding state holds what a mixer keeps of the tokens it has seen: keys and values (attention),
compressed latents (MLA), a recurrent matrix (retention). Advancing is the mixer's job: ``forward(x,
state)`` consumes ``x (B, T, d_model)`` and advances the state in place by ``T`` positions, so
``length`` grows by ``T``. Decoders only ever need to go back, which the protocol names:

* ``snapshot()`` marks the current position and ``restore(snapshot)`` returns to it, discarding
  whatever was fed since. Speculative decoding (Leviathan et al. 2023, §2.3) snapshots before feeding
  drafted tokens and restores when they are rejected.
* ``left_pad`` (a ``(B,)`` long tensor, or None) says that row ``b``'s first ``left_pad[b]`` positions are
  padding: batches of prompts of different lengths are left-padded so that every row's next token sits
  at the same index. Decoders set it on fresh states (:meth:`zoo.ZooModel.init_states`); mixers read it
  through :meth:`DecodingState.positions` (rotary positions count from 0 at a row's first real token)
  and :meth:`DecodingState.real_keys` (attention never attends to a pad; a recurrent state never
  takes one in), so that a padded row decodes exactly as the same row alone.
* ``can_rewind`` states also drop their last ``n`` positions with ``rewind(n)``, keeping the ones
  before: after a verification pass, a KV cache keeps the accepted tokens' positions, whereas a
  recurrent state, which has folded every token into one matrix, must be restored and fed the
  accepted tokens again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class DecodingState(ABC):
    """A mixer's decoding state: ``length`` positions held, rolled back by ``snapshot``/``restore``.

    Advanced in place by the owning mixer's ``forward``; see the module docstring for the contract.
    """

    length: int  # positions fed so far, pads included
    left_pad: torch.Tensor | None = None  # (B,) leading pad positions per row; None: no padding
    can_rewind: ClassVar[bool] = False

    def positions(self) -> int | torch.Tensor:
        """The rotary position of the next token: ``length`` without padding, else a ``(B,)`` tensor
        ``length - left_pad`` (negative while a row is still in its padding; rotary tables clamp it to 0)."""
        return self.length if self.left_pad is None else self.length - self.left_pad

    def real_keys(self, end: int) -> torch.Tensor | None:
        """``(B, end)`` bool, True at the positions ``0..end-1`` that hold real tokens; None without padding."""
        if self.left_pad is None:
            return None
        return torch.arange(end, device=self.left_pad.device)[None, :] >= self.left_pad[:, None]

    @abstractmethod
    def snapshot(self) -> object:
        """An opaque mark of the current position, taken without copying the state's tensors (decoders
        take one per layer and step)."""

    @abstractmethod
    def restore(self, snapshot: object) -> None:
        """Return to the position ``snapshot`` marks, discarding what was fed after it. The mark comes from
        this state, and its positions must not have been discarded since (by rolling back before it)."""

    def rewind(self, n: int) -> None:
        """Drop the last ``n`` positions (only where ``can_rewind``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop positions: restore a snapshot "
                                  f"and feed the positions to keep again")


class PositionalCache(DecodingState):
    """A state holding one entry per position in buffers preallocated to ``max_len`` (KV caches).

    Positions past ``length`` are never read and get overwritten by the next append, so a snapshot
    is just the length and restoring or rewinding only moves it back.
    """

    can_rewind = True

    def snapshot(self) -> int:
        return self.length

    def restore(self, snapshot: int) -> None:
        if not 0 <= snapshot <= self.length:
            raise ValueError(f"cannot restore a {type(self).__name__} holding {self.length} positions to "
                             f"{snapshot}: the positions after {self.length} were dropped or never fed")
        self.length = snapshot

    def rewind(self, n: int) -> None:
        self.restore(self.length - n)
