"""The blocked float32 cross-entropy equals a plain one: values and gradients, ignored labels, shifts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo import losses
from zoo.losses import shifted_cross_entropy


def reference(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Position t scored on labels[t + shift], positions past the labels dropped, in float64."""
    T = logits.shape[1]
    scored = min(T, labels.shape[1] - shift)
    return F.cross_entropy(logits[:, :scored].double().flatten(0, 1), labels[:, shift:shift + scored].flatten(),
                           ignore_index=-100)


@pytest.mark.parametrize("shift", [1, 3])
def test_blocks_equal_one_cross_entropy_in_float64(monkeypatch, shift):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 3 * 50)  # blocks of 3 positions, the last one short
    logits = torch.randn(2, 11, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, 4] = labels[1, 7] = -100
    got = shifted_cross_entropy(logits, labels, shift)
    expected = reference(logits, labels, shift)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert grad[:, 11 - shift:].abs().max() == 0  # positions with no label get no gradient


def test_bf16_logits_are_scored_in_float32(monkeypatch):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 4 * 64)
    logits = (3 * torch.randn(2, 9, 64)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 64, (2, 9))
    got = shifted_cross_entropy(logits, labels)
    assert got.dtype == torch.float32
    expected = reference(logits.float(), labels, 1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-4)
