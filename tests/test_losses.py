"""The blocked float32 cross-entropies equal a plain one: values and gradients, ignored labels, shifts;
the fused head + loss equals the head followed by the loss, alone and inside a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.model import losses
from zoo.model.losses import linear_cross_entropy, shifted_cross_entropy


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


@pytest.mark.parametrize("shift", [1, 2])
def test_linear_cross_entropy_equals_the_plain_one_in_float64(monkeypatch, shift):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 3 * 40)  # blocks of 3 positions,
    monkeypatch.setattr(losses, "WEIGHT_GRAD_ELEMENTS", 2 * 3 * 40)  # weight gradients per 2 blocks
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, 5] = -100
    got = linear_cross_entropy(hidden, weight, labels, shift)
    expected = reference(hidden @ weight.t(), labels, shift)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(2.5 * got, (hidden, weight))
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the loss alone, no gradient work
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, shift), expected.detach())


def test_linear_cross_entropy_under_bf16_autocast_stays_close_to_float32():
    hidden = torch.randn(2, 33, 32, requires_grad=True)
    weight = (0.3 * torch.randn(300, 32)).requires_grad_()
    labels = torch.randint(0, 300, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels)
    assert got.dtype == torch.float32
    expected = reference(hidden.double() @ weight.double().t(), labels, 1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(got, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert (grad.double() - expected_grad).norm() / expected_grad.norm() < 2e-2


def test_model_loss_without_logits_equals_the_loss_with_them():
    model = zoo.create_model("mtp-tiny", d_model=32, n_layers=2, mixer={"n_heads": 4, "n_kv_heads": 2},
                             ffn={"d_hidden": 64}).double()
    ids = torch.randint(0, 257, (2, 12))
    with_logits = model(ids, labels=ids)
    grads = torch.autograd.grad(with_logits.loss, list(model.parameters()))
    fused = model(ids, labels=ids, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.lm_loss, with_logits.lm_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.mtp_loss, with_logits.mtp_loss, rtol=1e-12, atol=1e-12)
    for grad, expected in zip(torch.autograd.grad(fused.loss, list(model.parameters())), grads):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="return_logits=False needs labels"):
        model(ids, return_logits=False)
