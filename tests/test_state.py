"""The decoding state protocol (zoo.blocks.state) over every registered mixer.

A restored state must be indistinguishable from one that never saw the discarded tokens: outputs are
compared exactly (float64, same operations on the same inputs), not within a tolerance.
"""

import pytest
import torch

import zoo
from zoo.blocks.state import DecodingState, PositionalCache

VOCAB = 97
MIXER_OPTIONS = {"attention": {"n_heads": 4, "n_kv_heads": 2}}
MIXERS = zoo.available_blocks("mixer")


def small_model(mixer: str) -> zoo.ZooModel:
    """A float64 two-layer model whose layers both use ``mixer``, with weights large enough that
    logits differ visibly between tokens."""
    torch.manual_seed(0)
    config = zoo.load_config("dense-tiny", {
        "model.d_model": 64, "model.n_layers": 2, "model.vocab_size": VOCAB, "model.max_seq_len": 64,
        "model.init_std": 0.2, "model.mixer": {"type": mixer, **MIXER_OPTIONS.get(mixer, {})}})
    return zoo.build_model(config).double().eval()


def feed(model, states, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of ``ids (B, T)`` fed one token at a time, then a 2-token chunk: both the
    one-token path and the chunked path (prefill, speculative verification) advance the states."""
    with torch.no_grad():
        steps = [model(ids[:, t:t + 1], states=states).logits for t in range(ids.shape[1] - 2)]
        return torch.cat([*steps, model(ids[:, -2:], states=states).logits], dim=1)


@pytest.mark.parametrize("mixer", MIXERS)
def test_init_state_is_an_empty_decoding_state(mixer):
    states = small_model(mixer).init_states(2, 16)
    assert all(isinstance(state, DecodingState) and state.length == 0 for state in states)


@pytest.mark.parametrize("mixer", MIXERS)
def test_restore_then_the_same_tokens_gives_identical_outputs(mixer):
    model = small_model(mixer)
    prompt, ids, other = (torch.randint(0, VOCAB, (2, T)) for T in (5, 4, 4))
    states = model.init_states(2, 16)
    feed(model, states, prompt)
    assert [state.length for state in states] == [5, 5]
    marks = [state.snapshot() for state in states]
    first = feed(model, states, ids)
    assert [state.length for state in states] == [9, 9]
    for state, mark in zip(states, marks):
        state.restore(mark)
    assert [state.length for state in states] == [5, 5]
    assert torch.equal(feed(model, states, ids), first)
    for state, mark in zip(states, marks):  # the same mark again, after other tokens
        state.restore(mark)
    detour = feed(model, states, other)
    fresh = model.init_states(2, 16)
    feed(model, fresh, prompt)
    assert torch.equal(detour, feed(model, fresh, other))


@pytest.mark.parametrize("mixer", MIXERS)
def test_rewind_keeps_the_positions_before(mixer):
    model = small_model(mixer)
    states = model.init_states(2, 16)
    ids = torch.randint(0, VOCAB, (2, 9))
    feed(model, states, ids[:, :4])
    feed(model, states, ids[:, 4:6])  # to drop
    if not all(state.can_rewind for state in states):
        with pytest.raises(NotImplementedError, match="cannot drop positions"):
            states[0].rewind(1)
        return
    for state in states:
        state.rewind(2)
    assert [state.length for state in states] == [4, 4]
    fresh = model.init_states(2, 16)
    feed(model, fresh, ids[:, :4])
    assert torch.equal(feed(model, states, ids[:, 4:]), feed(model, fresh, ids[:, 4:]))


def test_a_positional_cache_cannot_restore_past_what_it_holds():
    cache = small_model("attention").init_states(1, 16)[0]
    assert isinstance(cache, PositionalCache)
    cache.length = 5
    mark = cache.snapshot()
    cache.rewind(3)
    with pytest.raises(ValueError, match="holding 2 positions to 5"):
        cache.restore(mark)


def test_init_states_rejects_a_mixer_state_outside_the_protocol(monkeypatch):
    model = small_model("attention")
    monkeypatch.setattr(model.blocks[1].mixer, "init_state", lambda *args: {"k": None, "v": None})
    with pytest.raises(TypeError, match="Attention.init_state returned a dict, not a zoo.blocks.state.DecodingState"):
        model.init_states(1, 8)
