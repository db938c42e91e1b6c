"""Checkpoints written by zoo 0.1 (tests/fixtures/zoo-0.1, see PROVENANCE.md there) load with the logits and
buffers they were saved with: dense, MoE with a non-zero loss-free bias, hybrid retention, and MTP."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo

FIXTURES = Path(__file__).parent / "fixtures" / "zoo-0.1"


@pytest.mark.parametrize("name", ["dense", "moe", "hybrid", "mtp"])
def test_zoo_0_1_checkpoint_loads_with_its_logits_and_buffers(name):
    expected = load_file(FIXTURES / name / "expected.safetensors")
    model = zoo.from_pretrained(FIXTURES / name).eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        out = model(expected["input_ids"], labels=expected["input_ids"])
    torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], rtol=0, atol=1e-6)
    buffers = dict(model.named_buffers())
    saved = {k.removeprefix("buffer."): v for k, v in expected.items() if k.startswith("buffer.")}
    assert saved.keys() == set(model.state_dict()) & buffers.keys()
    for key, value in saved.items():
        assert torch.equal(buffers[key], value), key
    for key in buffers.keys() - saved.keys():  # not in a checkpoint: the balancing load counts start at zero
        assert torch.equal(buffers[key], torch.zeros_like(buffers[key])), key
