"""Post-training: the chat template, chat/preference data, the sft and dpo objectives, train.init_from,
freeze_router."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters import adapter_disabled, add_adapter
from zoo.errors import ConfigError
from zoo.tokenizer import CHAT_TOKENS, ByteTokenizer, HFTokenizer, with_chat_tokens
from zoo.train import instructions
from zoo.train.chat_data import encode_chat, encode_preference, pad_batch, read_jsonl
from zoo.train.finetune import DPO, SFT, DPOConfig, SFTConfig, dpo_loss, sequence_logps
from zoo.train.init_from import grow_vocabulary, load_initial_model
from zoo.train.run import train

TINY_MODEL = {"vocab_size": None, "d_model": 32, "n_layers": 1, "max_seq_len": 64,
              "mixer": {"type": "attention", "n_heads": 4, "n_kv_heads": 2}, "ffn": {"type": "mlp", "d_hidden": 64}}
RUN = {"batch_size": 2, "val_batches": 1, "log_every": 1, "sample_tokens": 4, "precision": "32-true",
       "schedule": {"warmup_steps": 1}, "max_steps": 2, "val_check_interval": 2, "checkpoint_every": 100}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Ok"}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def chat_tokenizer():
    return with_chat_tokens(ByteTokenizer())


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(6)])


def preference_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pref.jsonl", [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                                 for i in range(6)])


# --------------------------------------------------------------------------- chat template and SFT masking


def test_chat_template_adds_one_id_per_marker_and_renders_as_transformers_does(chat_tokenizer):
    assert chat_tokenizer.vocab_size == 257 + len(CHAT_TOKENS)
    ids = [chat_tokenizer.encode(token) for token in CHAT_TOKENS]
    assert ids == [[257], [258], [259], [260]]
    text = chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n"
                    "<|user|>\nBye?<|end|>\n<|assistant|>\nOk<|end|>\n<|assistant|>\n")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.tokenizer, chat_template=chat_tokenizer.chat_template)
    assert hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == text
    with pytest.raises(ValueError, match="no chat template"):
        ByteTokenizer().apply_chat_template(CHAT)


def test_chat_template_travels_with_the_tokenizer_file(tmp_path, chat_tokenizer):
    (tmp_path / "tokenizer.json").write_text(chat_tokenizer.to_json())
    (tmp_path / "tokenizer_config.json").write_text(chat_tokenizer.tokenizer_config())
    loaded = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.apply_chat_template(CHAT) == chat_tokenizer.apply_chat_template(CHAT)
    assert with_chat_tokens(loaded) is loaded  # has them already: nothing added twice


def test_sft_labels_mask_every_non_assistant_position(chat_tokenizer):
    ids, labels = encode_chat(chat_tokenizer, CHAT, seq_len=1000)
    user, assistant, system, end = 258, 259, 257, 260
    by_hand = ([system] + list(b"\nBe brief.") + [end] + list(b"\n") + [user] + list(b"\nHi") + [end] + list(b"\n")
               + [assistant] + list(b"\n"), list(b"Yo") + [end] + list(b"\n"),
               [user] + list(b"\nBye?") + [end] + list(b"\n") + [assistant] + list(b"\n"), list(b"Ok") + [end] + list(b"\n"))
    assert ids == [t for part in by_hand for t in part]
    expected = [t if i % 2 else -100 for i, part in enumerate(by_hand) for t in part]
    assert labels == expected
    assert encode_chat(chat_tokenizer, CHAT, seq_len=20) == (ids[:20], labels[:20])


def test_sft_loss_is_the_cross_entropy_of_assistant_tokens_only(chat_tokenizer):
    model = zoo.build_model(zoo.ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 261})).double()
    batch = pad_batch([encode_chat(chat_tokenizer, CHAT, 64), encode_chat(chat_tokenizer, CHAT[:3], 64)],
                      chat_tokenizer.eot_id)
    out = SFT(SFTConfig())(model, batch)
    logp = torch.log_softmax(model(batch["input_ids"]).logits, -1)
    terms = [-logp[b, t - 1, batch["labels"][b, t]] for b in range(2) for t in range(1, batch["labels"].shape[1])
             if batch["labels"][b, t] != -100]
    assert out.eval_weight == len(terms) == 2 * 4 + 4  # "Yo<|end|>\n", "Ok<|end|>\n"; "Yo<|end|>\n"
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- data


def test_bad_jsonl_records_name_their_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    cases = {"chat": ([good, "", "{not json"], "line 3: not valid JSON"),
             "preference": ([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": 3}],
                            "line 2: chosen, rejected must be string")}
    for format, (records, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            read_jsonl(write_jsonl(tmp_path / f"{format}.jsonl", records), format)
    with pytest.raises(ConfigError, match=r"line 2: messages\[1\] must be"):
        read_jsonl(write_jsonl(tmp_path / "roles.jsonl", [good, {"messages": [{"role": "user", "content": "a"},
                                                                               {"role": "bot", "content": "b"}]}]), "chat")
    with pytest.raises(ConfigError, match="train.data.path"):
        zoo.load_config("dense-tiny", {"train.data.format": "chat", "train.data.path": str(tmp_path / "missing.jsonl")})


def test_embedded_set_is_split_by_module_and_rejects_a_sibling_summary():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in ("json/__init__.py", "shlex.py", "textwrap.py", "fnmatch.py", "glob.py", "bisect.py")]
    modules = instructions.build_records(files, root)
    assert ("json.dumps", modules["json"][[n for n, _ in modules["json"]].index("json.dumps")][1]) in modules["json"]
    train_names, val_names = instructions.split_modules(list(modules), 0.3, seed=0)
    assert not set(train_names) & set(val_names) and sorted(train_names + val_names) == sorted(modules)
    assert (train_names, val_names) == instructions.split_modules(list(modules), 0.3, seed=0)  # deterministic
    asked = {side: {r["messages"][0]["content"].split()[2].rsplit(".", 1)[0]
                    for r in instructions.chat_records(modules, names)} for side, names in (("t", train_names), ("v", val_names))}
    assert asked["t"] == set(train_names) and asked["v"] == set(val_names)
    summaries = dict(entry for entries in modules.values() for entry in entries)
    for record in instructions.preference_records(modules, list(modules)):
        name = record["prompt"].split()[2]
        module = name.rsplit(".", 1)[0]
        assert record["chosen"] == summaries[name] != record["rejected"]
        assert record["rejected"] in {s for _, s in modules[module]}


# --------------------------------------------------------------------------- DPO


def trl_loss(pc, pr, rc, rr, beta, loss_type):
    """TRL 1.16's DPO loss (``DPOTrainer._compute_loss``) on given sequence log-probabilities: one-token
    completions whose log-probability is the sequence's, reference log-probabilities precomputed."""
    from trl import DPOTrainer

    B = pc.shape[0]
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                              precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                              loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
                              label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                              _tp_size=1)
    logps = torch.cat([pc, pr])[:, None]

    def model(**kwargs):
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                               is_top1=torch.zeros_like(logps, dtype=torch.bool))

    inputs = {"input_ids": torch.zeros(2 * B, 2, dtype=torch.long), "attention_mask": torch.ones(2 * B, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * (2 * B)), "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_matches_the_papers_and_trl(loss):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 4 - 20 for _ in range(4))
    beta = 0.3
    ours = dpo_loss(pc, pr, rc, rr, beta, loss)
    for i in range(8):
        h = float(pc[i] - rc[i] - pr[i] + rr[i])
        by_hand = math.log1p(math.exp(-beta * h)) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2
        assert float(ours[i]) == pytest.approx(by_hand, rel=1e-12)
    torch.testing.assert_close(ours.mean(), trl_loss(pc, pr, rc, rr, beta, loss), rtol=1e-12, atol=1e-12)


def test_sequence_logps_sums_the_scored_positions():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 0, 3] + logp[0, 1, 4], logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 6]])
    torch.testing.assert_close(sequence_logps(logits, labels), expected, rtol=1e-12, atol=1e-12)


def preference_batch(tokenizer):
    records = [{"prompt": "Hi", "chosen": "Yo!", "rejected": "No"}, {"prompt": "2+2?", "chosen": "4", "rejected": "five"}]
    encoded = [encode_preference(tokenizer, r, 64) for r in records]
    return pad_batch([e[0] for e in encoded] + [e[1] for e in encoded], tokenizer.eot_id)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_dpo_reference_is_the_initial_model(chat_tokenizer, adapter):
    base = zoo.build_model(zoo.ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 261}))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_adapter(base, {"type": "lora", "r": 4}) if adapter else base
    batch = preference_batch(chat_tokenizer)
    dpo = DPO(DPOConfig(beta=0.5))
    dpo.prepare(model)
    assert (dpo.reference is None) == adapter  # with an adapter: no second copy
    out = dpo(model, batch)
    assert out.eval_metrics["reward_accuracy"] == 0.5 and out.eval_metrics["reward_margin"] == 0  # policy = reference
    assert out.loss.item() == pytest.approx(math.log(2))
    out.loss.backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    with torch.no_grad():
        moved = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
        plain = zoo.build_model(zoo.ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 261}))
        plain.load_state_dict(frozen)
        initial = sequence_logps(plain(batch["input_ids"]).logits, batch["labels"])
    reference = dpo.reference_logps(model, batch["input_ids"], batch["labels"])
    assert not torch.allclose(moved, initial)  # the policy moved ...
    torch.testing.assert_close(reference, initial, rtol=0, atol=1e-5)  # ... the reference did not
    step = dpo(model, batch).eval_metrics
    assert step["reward_margin"] > 0  # one step towards the chosen answers


# --------------------------------------------------------------------------- init_from


def pretrained(tmp_path) -> Path:
    config = zoo.load_config("dense-tiny", {"model": TINY_MODEL, "train.out_dir": str(tmp_path / "pre"),
                                            "train.data": {"corpus": "pydoc-topics", "seq_len": 32},
                                            **{f"train.{k}": v for k, v in RUN.items()}})
    return train(config).out_dir


def test_sft_with_lora_then_dpo_from_a_zoo_checkpoint(tmp_path):
    run_dir = pretrained(tmp_path)
    common = {**{f"train.{k}": v for k, v in RUN.items()}, "model.adapter": {"type": "lora", "r": 4},
              "train.optimizer": {"lr": 0.05}}
    sft = zoo.load_config("sft-tiny", {**common, "train.init_from": str(run_dir), "train.out_dir": str(tmp_path / "sft"),
                                       "train.data": {"format": "chat", "path": str(chat_file(tmp_path)), "seq_len": 32,
                                                      "val_fraction": 0.3}})
    assert sft.train.data.tokenizer == str(run_dir / "final" / "tokenizer.json")
    result = train(sft)
    assert result.steps == 2 and result.config.model.vocab_size == 261  # grown by the four chat markers
    assert result.config.model.adapter.options.trainable_tokens == [257, 258, 259, 260]
    model = result.module.model.eval()
    assert model.adapter_base == str((tmp_path / "sft" / "base").resolve())  # the grown base, saved to be named
    base = zoo.from_pretrained(tmp_path / "sft" / "base")
    embed = base.embed.weight
    torch.testing.assert_close(embed[257:], embed[:257].mean(0).expand(4, -1))  # new rows: the mean
    # Only the adapter trained: every base tensor bitwise as saved, the new token rows moved off the mean.
    trained = model.state_dict()
    assert all(torch.equal(trained[name], tensor) for name, tensor in base.state_dict().items())
    assert not torch.allclose(model.embed.token_rows, embed[257:])
    ids = torch.randint(0, 261, (1, 12))
    ids[0, ::3] = torch.tensor([257, 258, 259, 260])  # the chat markers in the input
    with adapter_disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)

    # final/: adapter files naming ../base, loadable as the trained model, also once the run directory moved.
    final = tmp_path / "sft" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model"] == "../base"
    assert not (final / "config.json").exists()
    moved = tmp_path / "moved" / "sft"
    moved.parent.mkdir()
    (tmp_path / "sft").rename(moved)
    loaded = zoo.from_pretrained(moved / "final").eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.tokenizer.vocab_size == 261 and loaded.tokenizer.chat_template is not None
    rerun = zoo.load_config(str(moved / "run_config.yaml"))  # the grown vocab_size reads back as growth
    assert rerun.model == result.config.model

    dpo = zoo.load_config("dpo-tiny", {**common, "train.init_from": str(moved / "final"),
                                       "train.out_dir": str(tmp_path / "dpo"),
                                       "train.data": {"format": "preference", "path": str(preference_file(tmp_path)),
                                                      "seq_len": 32, "val_fraction": 0.3}})
    assert dpo.model.vocab_size == 261 and dpo.train.data.tokenizer == str(moved / "final" / "tokenizer.json")
    result = train(dpo)
    rows = (tmp_path / "dpo" / "metrics.csv").read_text()
    for name in ("train/rewards_chosen", "train/rewards_rejected", "train/reward_accuracy", "train/reward_margin",
                 "val/rewards_chosen", "val/reward_accuracy", "val/reward_margin", "val/rewards_rejected"):
        assert name in rows
    initial = load_initial_model(result.config.model, str(moved / "final"), 261)
    assert initial.changed and initial.added_tokens == [] and initial.model.config.adapter is None  # SFT merged
    assert result.config.model.adapter.options.trainable_tokens == []  # no token added: none trains
    with adapter_disabled(result.module.model):  # DPO's reference: the SFT model, its adapter merged
        torch.testing.assert_close(result.module.model.eval()(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_init_from_an_imported_transformers_checkpoint_trains(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text(ByteTokenizer().to_json())
    run = zoo.load_config({"train": {**RUN, "init_from": str(tmp_path / "llama"), "out_dir": str(tmp_path / "run"),
                                     "objective": {"type": "sft"},
                                     "data": {"format": "chat", "path": str(chat_file(tmp_path)), "seq_len": 32,
                                              "val_fraction": 0.3}}})
    assert run.model.vocab_size == 300 and run.model.d_model == 32
    result = train(run)
    assert result.steps == 2 and result.config.model.vocab_size == 300  # the markers fit in the spare ids


def test_shape_changing_override_is_a_config_error_and_others_are_allowed(tmp_path):
    run_dir = pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model.d_model: checkpoint 32, override 64") as err:
        zoo.load_config({"train": {"init_from": str(run_dir)}, "model": {"d_model": 64, "init_std": 0.01}})
    assert "init_std" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model.ffn.d_hidden: checkpoint 64, override 96"):
        zoo.load_config({"train": {"init_from": str(run_dir)}, "model": {"ffn": {"d_hidden": 96}}})
    allowed = zoo.load_config({"train": {"init_from": str(run_dir / "final")},
                               "model": {"init_std": 0.01, "adapter": {"type": "lora", "r": 2}}})
    assert allowed.model.d_model == 32 and allowed.model.adapter.options.r == 2
    with pytest.raises(ConfigError, match="train.init_from"):
        zoo.load_config({"train": {"init_from": str(tmp_path / "nowhere")}})


def test_grow_vocabulary_adds_mean_rows_to_an_untied_head():
    model = zoo.build_model(zoo.ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 10, "tie_embeddings": False}))
    ids = torch.randint(0, 10, (1, 6))
    before = model(ids).logits
    grow_vocabulary(model, 13)
    after = model(ids).logits
    assert model.config.vocab_size == 13 and after.shape[-1] == 13
    torch.testing.assert_close(after[..., :10], before)
    torch.testing.assert_close(model.head.weight[10:], model.head.weight[:10].mean(0).expand(3, -1))


# --------------------------------------------------------------------------- freeze_router


@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_router_stops_router_gradient_and_bias(frozen):
    config = zoo.ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 50, "ffn": {
        "type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 16, "loss_free_bias": True, "freeze_router": frozen}})
    model = zoo.build_model(config).train()
    router = model.blocks[0].ffn.router
    ids = torch.randint(0, 50, (2, 16))
    model(ids, labels=ids).loss.backward()
    router.on_optimizer_step(lambda t: t)
    assert router.weight.requires_grad is not frozen and (router.weight.grad is None) is frozen
    assert bool((router.expert_bias == 0).all()) is frozen  # loaded unevenly: only a free router's bias moves
    loaded = zoo.checkpoint.pretrained.load_model(config, model.state_dict(), "memory")
    assert loaded.blocks[0].ffn.router.weight.requires_grad is not frozen
