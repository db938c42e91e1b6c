"""Decoding (zoo.model.generation): eval mode whatever the model's mode, eos stopping, sampling filters."""

import pytest
import torch

import zoo
from zoo.blocks.router import Router
from zoo.model.generation import sample

SMALL = {"n_layers": 2, "d_model": 64, "vocab_size": 97, "max_seq_len": 64,
         "mixer": {"n_heads": 4, "n_kv_heads": 2}, "ffn": {"d_hidden": 64}}


def small_model(preset: str, **fields) -> zoo.ZooModel:
    return zoo.create_model(preset, **{**SMALL, **fields}).double()  # create_model: in training mode


def test_greedy_generate_of_a_training_mode_switch_model_is_eval_argmax():
    model = small_model("switch-tiny", init_std=0.3)  # large enough weights for drops to flip tokens
    assert model.training
    prompt = torch.randint(0, 97, (2, 9))
    generated = model.generate(prompt, max_new_tokens=7)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        logits = model.eval()(generated).logits
    # Token dropping at training capacity during the prefill would change these tokens.
    assert torch.equal(logits[:, 8:-1].argmax(-1), generated[:, 9:])


def test_generate_restores_each_modules_own_mode():
    model = small_model("switch-tiny")
    model.blocks[0].eval()
    modes = [m.training for m in model.modules()]
    model.generate(torch.randint(0, 97, (1, 4)), max_new_tokens=2)
    assert [m.training for m in model.modules()] == modes


def test_decoding_leaves_router_load_counts_untouched():
    model = small_model("deepseek-moe-tiny", mtp={"depth": 1})
    routers = [m for m in model.modules() if isinstance(m, Router) and m.expert_load is not None]
    assert len(routers) == 2  # layer 1 (layer 0 is dense) and the MTP module
    prompt = torch.randint(0, 97, (1, 6))
    plain = model.generate(prompt, max_new_tokens=5)
    speculative = model.generate(prompt, max_new_tokens=5, speculative="mtp")
    assert torch.equal(speculative, plain) and model.training
    assert all(r.expert_load.sum().item() == 0 for r in routers)


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = small_model("dense-tiny").eval()
    prompt = torch.randint(0, 97, (2, 5))
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 5 + 2])  # row 0's third new token
    stopped = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    first = [(row[5:] == eos).nonzero()[0].item() if (row[5:] == eos).any() else None for row in free]
    assert first[0] <= 2
    length = 10 if None in first else max(first) + 1
    assert stopped.shape == (2, 5 + length)
    for row, stop in enumerate(first):
        end = 5 + (length if stop is None else stop + 1)
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos).all()


def test_sampling_is_reproducible_with_a_generator():
    model = small_model("dense-tiny").eval()
    prompt = torch.randint(0, 97, (2, 5))

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, generator=generator)

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_sampling_stays_inside_top_k_and_the_top_p_nucleus():
    logits = torch.linspace(2.0, -2.0, 20)[torch.randperm(20)]  # distinct logits in a random order
    rows = logits.expand(4000, 20)
    order = logits.argsort(descending=True)
    top_k = sample(rows, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(top_k.tolist()) == set(order[:5].tolist())

    probs = logits.softmax(-1)[order]
    n_nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1  # the fewest top tokens holding 60% of the mass
    assert 1 < n_nucleus < 20
    top_p = sample(rows, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(top_p.tolist()) == set(order[:n_nucleus].tolist())

    both = sample(rows, temperature=1.0, top_k=3, top_p=0.99, generator=torch.Generator().manual_seed(0))
    assert set(both.tolist()) == set(order[:3].tolist())


@pytest.mark.parametrize("options, message", [
    ({"top_k": 0}, r"top_k must be a positive integer or None.*got 0"),
    ({"top_k": -3}, r"top_k must be a positive integer.*got -3"),
    ({"top_k": 2.5}, r"top_k must be a positive integer.*got 2.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\].*got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\].*got 1.5"),
    ({"temperature": -1.0}, r"temperature must be >= 0.*got -1.0"),
])
def test_bad_sampling_options_are_value_errors(options, message):
    model = small_model("dense-tiny", n_layers=1)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, **{"temperature": 1.0, **options})
    with pytest.raises(ValueError, match=message):
        sample(torch.randn(2, 97), **{"temperature": 1.0, **options})
