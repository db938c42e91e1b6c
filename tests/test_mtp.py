"""Multi-token prediction (zoo.model.mtp, DeepSeek-V3 §2.2) and self-speculative decoding.

References are float64: the loss against a hand-written per-position reference (1e-6), speculative greedy
decoding against plain greedy decoding (token for token), dropping and loading against the main logits.
"""

import csv
import functools

import pytest
import torch

import zoo
from zoo.blocks.auxiliary import AuxCollector
from zoo.errors import ConfigError
from zoo.checkpoint.pretrained import from_pretrained, load_model
from zoo.errors import CheckpointError

VOCAB = 13
MIXERS = {"attention": {"type": "attention", "n_heads": 4, "n_kv_heads": 2},
          "retention": {"type": "retention", "n_heads": 4},
          "mla": {"type": "mla", "n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 4, "v_head_dim": 8}}
MOE = {"type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 16, "score_func": "sigmoid",
       "loss_free_bias": True, "seq_aux_loss_weight": 1.0e-4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny float64 shapes run fastest on one thread, which also keeps OpenMP workers from spinning
    against other jobs on a shared CPU (measured here: 12 s for the file instead of 40 s to 5 min)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(depth=2, heads="sequential", mixer="attention", ffn=None, **overrides):
    mtp = None if depth is None else {"depth": depth, "loss_weight": 0.3, "heads": heads}
    return zoo.load_config("dense-tiny", {
        "model.vocab_size": VOCAB, "model.d_model": 32, "model.n_layers": 2, "model.max_seq_len": 64,
        "model.mixer": MIXERS[mixer], "model.ffn": ffn or {"type": "mlp", "d_hidden": 48}, "model.mtp": mtp,
        **overrides})


def model64(cfg, seed=0, std=0.3):
    """A float64 model with large random weights (so that logits are far from ties)."""
    torch.manual_seed(seed)
    model = zoo.build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
    return model


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# --------------------------------------------------------------------------- config


def test_config_round_trips_and_defaults():
    cfg = zoo.load_config("dense-tiny", {"model.mtp": {"depth": 2}})
    assert (cfg.model.mtp.depth, cfg.model.mtp.loss_weight, cfg.model.mtp.heads) == (2, 0.3, "sequential")
    assert zoo.load_config(cfg.to_dict()).model.mtp == cfg.model.mtp
    assert zoo.load_config("dense-tiny").model.mtp is None


@pytest.mark.parametrize("mtp, words", [
    ({"depth": 0}, ["model.mtp", "depth", ">= 1"]),
    ({"depth": 1, "loss_weight": -1}, ["model.mtp", "loss_weight"]),
    ({"depth": 1, "heads": "tree"}, ["model.mtp.heads", "sequential", "parallel"]),
    ({"depth": 1, "dept": 2}, ["model.mtp.dept", "depth"]),
    ({"depth": "two"}, ["model.mtp.depth", "integer"]),
    ({"depth": 1, "ffn": {"type": "moee"}}, ["model.mtp.ffn.type", "moe"]),
])
def test_bad_mtp_config_names_the_key(mtp, words):
    with pytest.raises(ConfigError) as err:
        zoo.load_config("dense-tiny", {"model.mtp": mtp})
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("heads", ["sequential", "parallel"])
def test_loss_matches_per_position_reference(heads):
    """Depth k at position i: [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] -> proj -> block -> norm -> head,
    scored on t_{i+k+1}; loss = lambda / D * sum_k CE_k (DeepSeek-V3 Eq. 21-25; Gloeckle et al. §2)."""
    D, T = 3, 11
    model = model64(config(depth=D, heads=heads))
    ids = torch.randint(0, VOCAB, (2, T))
    labels = ids.clone()
    labels[1, 7] = -100
    out = model(ids, labels=labels)
    with torch.no_grad():
        h0 = model.hidden_states(ids, AuxCollector())  # depth 1 reads the state before the final norm
        emb = model.embed.weight[ids]
        prev, ces = h0, []
        for k in range(1, D + 1):
            module = model.mtp.layers[k - 1]
            if heads == "sequential":
                e = _rms(emb[:, k:], module.embed_norm.weight, module.embed_norm.eps)
                hh = _rms(prev[:, :T - k], module.hidden_norm.weight, module.hidden_norm.eps)
                x = torch.cat([e, hh], -1) @ module.proj.weight.T  # embedding first
            else:
                x = h0[:, :T - k]
            hk = module.block(x, AuxCollector())
            logp = (_rms(hk, module.norm.weight, module.norm.eps) @ model.embed.weight.T).log_softmax(-1)
            terms = [-logp[b, i, labels[b, i + k + 1]] for b in range(2) for i in range(T - k - 1)
                     if labels[b, i + k + 1] != -100]
            ces.append(torch.stack(terms).mean())
            prev = hk
        expected = 0.3 / D * sum(ces)
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-6, atol=1e-6)
    for k, ce in enumerate(ces, start=1):
        torch.testing.assert_close(out.metrics[f"mtp_ce_{k}"], ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss, rtol=1e-12, atol=1e-12)


def test_mtp_loss_reaches_future_tokens_only_through_targets():
    """Changing t_j changes depth-k predictions only at positions i >= j - k (it enters as t_{i+k})."""
    model = model64(config(depth=2))
    ids = torch.randint(0, VOCAB, (1, 12))
    h = model.hidden_states(ids, AuxCollector())
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % VOCAB
    h2 = model.hidden_states(changed, AuxCollector())
    for k in (1, 2):
        a = model.mtp.step(k, h[:, :12 - k], ids[:, k:], model.embed, AuxCollector())
        b = model.mtp.step(k, h2[:, :12 - k], changed[:, k:], model.embed, AuxCollector())
        torch.testing.assert_close(a[:, :8 - k], b[:, :8 - k], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, 8 - k], b[:, 8 - k])
        h, h2 = a, b


def test_moe_mtp_block_reports_aux_losses_and_router_counts():
    model = model64(config(depth=1, ffn=MOE)).train()
    ids = torch.randint(0, VOCAB, (2, 10))
    out = model(ids, labels=ids)
    assert len(out.router_stats) == 3  # two main layers, then the MTP block
    assert int(out.router_stats[-1].sum()) == 2 * 9 * 2  # 9 positions at depth 1, top-2
    without = model(ids).router_stats
    assert len(without) == 2  # no labels: the MTP modules do not run
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.mtp_loss)


def test_training_logs_mtp_loss_and_updates_mtp_router_bias(tmp_path, monkeypatch):
    from zoo.train.run import train

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    cfg = config(depth=1, ffn=MOE, **{
        "model.vocab_size": None, "train.data": {"corpus": "pydoc-topics", "tokenizer": "bytes", "seq_len": 16},
        "train.batch_size": 4, "train.max_steps": 3, "train.val_check_interval": 3, "train.val_batches": 1,
        "train.checkpoint_every": 3, "train.log_every": 1, "train.sample_tokens": 0,
        "train.precision": "32-true", "train.out_dir": str(tmp_path / "run")})
    result = train(cfg)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mtp = [float(r["train/mtp_loss"]) for r in rows if r.get("train/mtp_loss")]
    ce = [float(r["train/mtp_ce_1"]) for r in rows if r.get("train/mtp_ce_1")]
    assert len(mtp) == 3 and all(m > 0 for m in mtp)
    torch.testing.assert_close(torch.tensor(mtp), 0.3 * torch.tensor(ce))
    bias = result.module.model.mtp.layers[0].block.ffn.router.expert_bias
    assert bias.abs().sum() > 0  # the loss-free balancing hook reached the MTP block's router


# --------------------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("mixer, heads, ffn", [
    ("attention", "sequential", None), ("retention", "sequential", None), ("attention", "parallel", None),
    ("retention", "parallel", None), ("mla", "sequential", None), ("attention", "sequential", MOE),
])
def test_speculative_equals_plain_greedy_random_model(mixer, heads, ffn):
    model = model64(config(depth=3, heads=heads, mixer=mixer, ffn=ffn))
    for T, n in [(1, 9), (4, 1), (6, 2), (9, 13)]:
        prompt = torch.randint(0, VOCAB, (1, T))
        plain = model.generate(prompt, max_new_tokens=n)
        ids, stats = model.generate(prompt, max_new_tokens=n, speculative="mtp", return_stats=True)
        assert torch.equal(ids, plain), (T, n)
        assert stats["drafted"] >= stats["accepted"] >= 0


def test_speculative_with_hybrid_main_model_and_own_mtp_blocks():
    """A retention model with an attention layer (restore + re-feed for all layers), and MTP blocks whose
    mixer and FFN differ from the main model's (a retention mixer and an MoE FFN under attention)."""
    hybrid = config(depth=2, mixer="retention", **{"model.layers": {1: {"mixer": MIXERS["attention"]}}})
    own = config(depth=2, **{"model.mtp": {"depth": 2, "mixer": MIXERS["retention"], "ffn": MOE}})
    for cfg in (hybrid, own):
        model = model64(cfg)
        for T, n in [(3, 11), (7, 6)]:
            prompt = torch.randint(0, VOCAB, (1, T))
            assert torch.equal(model.generate(prompt, n, speculative="mtp"), model.generate(prompt, n))
    assert type(model.mtp.layers[0].block.mixer).__name__ == "MultiScaleRetention"


@functools.cache
def _trained_on_cycle(mixer, heads, depth=2, steps=60):
    """A model trained until its MTP modules predict a cyclic token sequence well (high acceptance);
    cached, as tests only decode with it."""
    model = model64(config(depth=depth, heads=heads, mixer=mixer), std=0.05).train()
    torch.manual_seed(1)
    cycle = torch.randperm(VOCAB)[:7]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, 7, (4,))
        ids = cycle[(starts[:, None] + torch.arange(24)) % 7]
        ids = torch.where(torch.rand(ids.shape) < 0.1, torch.randint(0, VOCAB, ids.shape), ids)  # some noise
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval(), cycle


@pytest.mark.parametrize("mixer, heads", [("attention", "sequential"), ("retention", "sequential"),
                                          ("attention", "parallel")])
def test_speculative_equals_plain_greedy_trained_model(mixer, heads):
    """With drafts mostly accepted, every path (full acceptance, partial, rollback) is exercised."""
    model, cycle = _trained_on_cycle(mixer, heads)
    total = {"drafted": 0, "accepted": 0}
    for T, n in [(2, 20), (5, 7), (3, 1), (8, 30)]:
        prompt = cycle[torch.arange(T) % 7][None]
        prompt[0, -1] = (prompt[0, -1] + 3) % VOCAB  # an off-cycle token forces some rejections
        plain = model.generate(prompt, max_new_tokens=n)
        ids, stats = model.generate(prompt, max_new_tokens=n, speculative="mtp", return_stats=True)
        assert torch.equal(ids, plain), (T, n)
        total["drafted"] += stats["drafted"]
        total["accepted"] += stats["accepted"]
        assert stats["forward_passes"] <= n
    assert total["accepted"] / total["drafted"] > 0.5


def test_speculative_stops_at_eos_like_plain():
    model, cycle = _trained_on_cycle("attention", "sequential")
    prompt = cycle[None, :3].clone()
    eos = int(cycle[5])
    plain = model.generate(prompt, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, eos_token_id=eos, speculative="mtp"), plain)


def test_speculative_rejects_what_it_does_not_support():
    model = model64(config(depth=1))
    prompt = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(prompt, 4, repetition_penalty=1.2, speculative="mtp")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 4, temperature=-1.0, speculative="mtp")
    with pytest.raises(ValueError, match="'mtp'"):
        model.generate(prompt, 4, speculative="medusa")
    with pytest.raises(ValueError, match="no model.mtp"):
        model64(config(depth=None)).generate(prompt, 4, speculative="mtp")
    ids, stats = model.generate(prompt, 0, speculative="mtp", return_stats=True)
    assert torch.equal(ids, prompt) and stats["acceptance_rate"] == 0.0


# --------------------------------------------------------------------------- dropping and loading


def test_drop_mtp_keeps_main_logits():
    model = model64(config(depth=2))
    ids = torch.randint(0, VOCAB, (2, 9))
    before = model(ids).logits
    assert model.drop_mtp() is model and model.mtp is None and model.config.mtp is None
    assert not any(name.startswith("mtp.") for name in model.state_dict())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert model(ids, labels=ids).mtp_loss is None


def test_checkpoint_with_mtp_loads_without_it_and_vice_versa(tmp_path):
    model = model64(config(depth=2))
    ids = torch.randint(0, VOCAB, (1, 9))
    model.save_pretrained(tmp_path / "mtp")
    assert "| mtp | depth=2, heads=sequential" in (tmp_path / "mtp" / "README.md").read_text()
    assert from_pretrained(tmp_path / "mtp").mtp is not None
    plain = from_pretrained(tmp_path / "mtp", drop_mtp=True)
    assert plain.mtp is None and plain.config.mtp is None
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)

    with pytest.raises(CheckpointError, match=r"drop_mtp=True") as err:  # MTP weights, plain config
        load_model(config(depth=None).model, model.state_dict(), "ckpt")
    assert "mtp.layers.0.proj.weight" in str(err.value)

    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"model\.mtp") as err:  # plain weights, MTP config
        load_model(config(depth=1).model, plain.state_dict(), "ckpt")
    assert "mtp.layers.0.proj.weight" in str(err.value) and "mtp_init=True" in str(err.value)
    grown = load_model(config(depth=1).model, plain.state_dict(), "ckpt", mtp_init=True).double()
    torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert grown(ids, labels=ids).mtp_loss is not None


@pytest.mark.parametrize("mixer, heads", [("attention", "sequential"), ("retention", "sequential"),
                                          ("attention", "parallel")])
def test_drafts_are_the_mtp_modules_full_sequence_predictions(mixer, heads):
    """The drafts made from the decoding states equal depth k's predictions computed over the whole final
    sequence at once (the training path): replaying acceptance from those gives the same count."""
    D, T, n = 2, 4, 24
    model, cycle = _trained_on_cycle(mixer, heads)  # depth 2 = D
    prompt = cycle[None, :T].clone()
    ids, stats = model.generate(prompt, max_new_tokens=n, speculative="mtp", return_stats=True)
    L = ids.shape[1]
    with torch.no_grad():
        h = model.hidden_states(ids, AuxCollector())
        predictions, prev = [], h
        for k in range(1, D + 1):
            prev = model.mtp.step(k, (prev if heads == "sequential" else h)[:, :L - k], ids[:, k:], model.embed,
                                  AuxCollector())
            predictions.append(model.head(model.mtp.layers[k - 1].norm(prev)).argmax(-1)[0])
    N, accepted, drafted = T + 1, 0, 0
    while N < L:
        n_draft = min(D, L - N - 1)
        a = 0
        while a < n_draft and int(predictions[a][N - 2]) == int(ids[0, N + a]):
            a += 1
        accepted, drafted, N = accepted + a, drafted + n_draft, N + a + 1
    assert (stats["accepted"], stats["drafted"]) == (accepted, drafted)
