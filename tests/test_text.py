"""Text in, text out (zoo.model.text) and left-padded batched decoding through every mixer
(zoo.model.generation, the ``left_pad`` of zoo.blocks.state).

Padded rows are compared with the same rows decoded alone in float64: logits within 1e-10, tokens exact.
The repetition penalty is compared with transformers' ``RepetitionPenaltyLogitsProcessor`` on the same
logits; MTP speculative sampling with the exact distribution of plain sampling on a 5-token vocabulary.
"""

import math

import pytest
import torch

import zoo
from zoo.model.generation import apply_repetition_penalty
from zoo.model.text import TextStream
from zoo.tokenizer import ByteTokenizer

VOCAB = 61
MIXERS = {"attention": {"type": "attention", "n_heads": 4, "n_kv_heads": 2},
          "retention": {"type": "retention", "n_heads": 4},
          "mla": {"type": "mla", "n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 4, "v_head_dim": 8}}
MOE = {"type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 16, "score_func": "sigmoid"}
# Every registered mixer alone, hybrids of them, and an MoE FFN (padded tokens pass through the router too).
CASES = {**{name: {"model.mixer": options} for name, options in MIXERS.items()},
         "hybrid-retention-attention": {"model.mixer": MIXERS["retention"],
                                        "model.layers": {1: {"mixer": MIXERS["attention"]}}},
         "hybrid-mla-retention": {"model.mixer": MIXERS["mla"], "model.layers": {0: {"mixer": MIXERS["retention"]}}},
         "attention-moe": {"model.mixer": MIXERS["attention"], "model.ffn": MOE}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model64(overrides, vocab=VOCAB, std=0.3, seed=0, d_model=32):
    torch.manual_seed(seed)
    config = zoo.load_config("dense-tiny", {"model.vocab_size": vocab, "model.d_model": d_model,
                                            "model.n_layers": 2, "model.max_seq_len": 64,
                                            "model.ffn": {"type": "mlp", "d_hidden": 48}, **overrides})
    model = zoo.build_model(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
    return model


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_batch_decodes_each_row_as_alone(case):
    model = model64(CASES[case])
    torch.manual_seed(1)
    rows = [torch.randint(0, VOCAB, (T,)) for T in (7, 1, 4)]
    ids, mask = left_pad(rows, pad_id=5)
    batch = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    states = model.init_states(3, ids.shape[1] + 2, left_pad=(1 - mask).sum(1))
    with torch.no_grad():  # prefill + one step, padded vs alone: the pads change nothing
        prefill = model(ids, states=states).logits
        step = model(batch[:, ids.shape[1], None], states=states).logits
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(row):]), (case, i)
        with torch.no_grad():  # the same path alone: prefill, then one step
            own = model.init_states(1, len(row) + 2)
            ref = torch.cat([model(row[None], states=own).logits, model(alone[:, len(row), None], states=own).logits], 1)
        torch.testing.assert_close(prefill[i, -len(row):], ref[0, :-1], rtol=0, atol=1e-10)
        torch.testing.assert_close(step[i, 0], ref[0, -1], rtol=0, atol=1e-10)


def test_changing_a_pad_changes_nothing():
    """Pads are invisible, whatever their ids (for retention: they never enter the recurrent state)."""
    model = model64(CASES["hybrid-retention-attention"])
    ids, mask = left_pad([torch.randint(0, VOCAB, (6,)), torch.randint(0, VOCAB, (2,))])
    other = ids.clone()
    other[1, :4] = torch.randint(0, VOCAB, (4,))
    new = model.generate(ids, 5, attention_mask=mask)[:, 6:]
    assert torch.equal(new, model.generate(other, 5, attention_mask=mask)[:, 6:])
    assert not torch.equal(new[1], model.generate(other, 5)[1, 6:])  # the same ids unmasked do change it


@pytest.mark.parametrize("mixer", ["attention", "retention"])
def test_speculative_greedy_batch_with_padding_equals_rows_alone(mixer):
    """A 4-token vocabulary, so that random drafts are often right and rows accept different counts."""
    model = model64({"model.mixer": MIXERS[mixer], "model.mtp": {"depth": 2, "loss_weight": 0.3}}, vocab=4)
    rows = [torch.randint(0, 4, (T,)) for T in (3, 6, 1, 2)]
    ids, mask = left_pad(rows)
    out, stats = model.generate(ids, 12, attention_mask=mask, speculative="mtp", return_stats=True)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, ids.shape[1]:], model.generate(row[None], 12)[0, len(row):])
    assert stats["drafted"] > stats["accepted"] > 0


def test_bad_attention_masks_are_refused():
    model = model64(CASES["attention"])
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(ids, 2, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits, ids = torch.randn(3, VOCAB), torch.randint(0, VOCAB, (3, 9))
    seen = torch.zeros(3, VOCAB, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)
    # End to end: greedy decoding with the penalty is a full-forward loop through transformers' processor.
    model = model64(CASES["retention"])
    prompt = torch.randint(0, VOCAB, (1, 5))
    processor, ref = RepetitionPenaltyLogitsProcessor(1.5), prompt
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, processor(ref, model(ref).logits[:, -1]).argmax(-1, keepdim=True)], dim=1)
    out = model.generate(prompt, 8, repetition_penalty=1.5)
    assert torch.equal(out, ref) and not torch.equal(out, model.generate(prompt, 8))


# --------------------------------------------------------------------------- text


def byte_model(**overrides):
    model = model64({"model.mixer": MIXERS["attention"], **overrides}, vocab=257, std=0.15, d_model=32)
    model.tokenizer = ByteTokenizer()
    return model


def test_generate_text_batches_prompts_of_different_lengths_like_one_by_one():
    model = byte_model()
    prompts = ["def ", "import os\n", "x"]
    batched = model.generate_text(prompts, max_new_tokens=10)
    assert isinstance(batched, list) and batched == [model.generate_text(p, max_new_tokens=10) for p in prompts]
    ids = torch.tensor([list(b"x")])
    expected = ByteTokenizer().decode(model.generate(ids, 10)[0, 1:].tolist())
    assert batched[2] == expected.split("\ufffd")[0] or batched[2] == expected  # no end of text here


def test_streaming_joins_to_the_text_and_never_splits_a_character():
    model = byte_model()
    pieces = list(model.generate_text("hello", max_new_tokens=16, stream=True))
    assert "".join(pieces) == model.generate_text("hello", max_new_tokens=16) and len(pieces) > 1
    text = "naïve café — 北京 🎉 done"
    stream = TextStream(ByteTokenizer(), stop=[])
    pieces = [stream.add(b) for b in text.encode("utf-8")] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[len("naïve café — ".encode()) + 1] == ""  # the first byte of 北 waits for the others


def test_stop_strings_end_the_text_and_are_left_out():
    model = byte_model()
    full = model.generate_text("abc", max_new_tokens=20)
    stop = full[5:8]
    cut = full[:full.find(stop)]
    assert model.generate_text("abc", max_new_tokens=20, stop=[stop, "\x00never"]) == cut
    assert "".join(model.generate_text("abc", max_new_tokens=20, stop=[stop], stream=True)) == cut
    stream = TextStream(ByteTokenizer(), stop=["END"])
    shown = [stream.add(b) for b in b"ab EN"]
    assert "".join(shown) == "ab " and stream.add(ord("D")) == "" and stream.done  # "EN" held, then dropped
    new = model.generate(torch.tensor([list(b"abc")]), 20)[0, 3:].tolist()
    token = next(t for i, t in enumerate(new) if i >= 2 and t not in new[:i])  # a stop token, first seen at i
    assert model.generate_text("abc", max_new_tokens=20, stop=[token]) == ByteTokenizer().decode(new[:new.index(token)])
    with pytest.raises(ValueError, match="non-empty strings and token ids"):
        model.generate_text("abc", stop=[-1])


def test_end_of_text_ends_generation():
    model = byte_model()
    new = model.generate(torch.tensor([list(b"q")]), 6)[0, 1:].tolist()
    eot = next(t for i, t in enumerate(new) if i >= 2 and t not in new[:i])

    class EndsThere(ByteTokenizer):
        eot_id = eot

    model.tokenizer = EndsThere()
    expected = bytes(new[:new.index(eot)]).decode("utf-8", errors="replace")
    assert model.generate_text("q", 6) == expected
    assert "".join(model.generate_text("q", 6, stream=True)) == expected


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    model = byte_model()
    with pytest.raises(ValueError, match="no tokenizer"):
        model64(CASES["attention"]).generate_text("x")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = zoo.from_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer is not None and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert loaded.generate_text("print(", 8) == model.generate_text("print(", 8)
    bare = model64(CASES["attention"])
    bare.save_pretrained(tmp_path / "bare")
    assert zoo.from_pretrained(tmp_path / "bare").tokenizer is None


# --------------------------------------------------------------------------- speculative sampling


def test_speculative_sampling_has_plain_samplings_distribution():
    """Vocabulary 5, 3 new tokens: all 125 continuations enumerated exactly under plain sampling (top-k 4 at
    temperature 0.8), against 6000 speculative samples drawn as one batch (rows accept different counts);
    the chi-square statistic over the 64 continuations in the top-k support must stay under its ~0.999
    quantile (~98), and nothing may fall outside the support. Accepting every draft instead gives a
    statistic over 10^5 here (checked by hand), and the drafts' distribution is far from the main model's."""
    V, n, samples, options = 5, 3, 6000, {"temperature": 0.8, "top_k": 4}
    model = model64({"model.mixer": MIXERS["attention"], "model.mtp": {"depth": 2, "loss_weight": 0.3}},
                    vocab=V, std=0.6, seed=3)
    prompt = torch.tensor([[1, 3]])
    out, stats = model.generate(prompt.repeat(samples, 1), n, speculative="mtp", return_stats=True,
                                generator=torch.Generator().manual_seed(0), **options)
    conts = torch.cartesian_prod(*[torch.arange(V)] * n)  # (125, 3)
    with torch.no_grad():
        logits = model(torch.cat([prompt.repeat(len(conts), 1), conts], dim=1)).logits[:, 1:-1]  # (125, 3, V)
    from zoo.model.generation import sampling_probs
    p = sampling_probs(logits, **options).double().gather(-1, conts[..., None])[..., 0].prod(-1)  # (125,)
    index = (out[:, 2:] * torch.tensor([V * V, V, 1])).sum(-1)
    observed = torch.bincount(index, minlength=V ** n).double()
    expected = p * samples
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    bound = df + 3.1 * math.sqrt(2 * df)  # ~0.999 quantile (normal approximation)
    assert chi2 < bound, (chi2, bound)
    assert observed[~keep].sum() == 0  # nothing outside the top-k support
    assert 0 < stats["accepted"] < stats["drafted"]  # both branches ran: accepted drafts and resamples
    with torch.no_grad():  # the power check: first draft distribution vs the main model's at that position
        h = model.hidden_states(prompt, zoo.blocks.auxiliary.AuxCollector())
        p1 = sampling_probs(model.head(model.norm(h[:, -1])), **options)[0]
        q = model.mtp.step(1, h[:, :1], prompt[:, 1:], model.embed, zoo.blocks.auxiliary.AuxCollector())
        q2 = sampling_probs(model.head(model.mtp.layers[0].norm(q[:, -1])), **options)[0]
    assert float((p1 - q2).abs().sum()) / 2 > 0.2  # total variation: unchecked drafts would be far off
