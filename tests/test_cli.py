"""The ``zoo`` command (zoo.cli), run in-process through ``main(argv)`` on a tiny checkpoint: exit codes,
output, and a clear error naming close matches for a bad model name."""

import io
import json

import pytest
import torch

import zoo
from zoo.cli import COMMANDS, _fitting_prompt, main
from zoo.evaluation.scoring import perplexity
from zoo.tokenizer import ByteTokenizer, with_chat_tokens
from zoo.train.run import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory whose ``final/`` holds a tiny byte-level model with its tokenizer."""
    torch.manual_seed(0)
    model = zoo.create_model("dense-tiny", n_layers=1, d_model=32, max_seq_len=64, init_std=0.2,
                             mixer={"n_heads": 4, "n_kv_heads": 2}, ffn={"d_hidden": 48}).eval()
    model.tokenizer = ByteTokenizer()
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "final")
    return run, model


def test_list_and_a_pattern(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == zoo.list_models()
    assert main(["list", "*moe*"]) == 0
    assert capsys.readouterr().out.split() == zoo.list_models("*moe*") != []


def test_info_counts_parameters_without_building_weights(capsys, checkpoint):
    assert main(["info", "switch-tiny"]) == 0
    out = capsys.readouterr().out
    model = zoo.create_model("switch-tiny")
    assert f"{model.num_parameters():,} total, {model.num_parameters(active=True):,} active" in out
    assert "mixer attention(" in out and "ffn switch(" in out and "float32" in out and "bfloat16" in out
    run, tiny = checkpoint
    assert main(["info", str(run)]) == 0
    assert f"{tiny.num_parameters():,} total" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_bad_model_name_is_a_usage_error_naming_close_matches(capsys, command):
    assert main([command, "swich-tiny", *(["hi"] if command == "generate" else [])]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swich-tiny'" in err and "did you mean switch-tiny" in err


def test_generate_streams_the_continuation(capsys, checkpoint):
    run, model = checkpoint
    assert main(["generate", str(run), "def f(", "--max-new-tokens", "12", "--stop", "\n\n"]) == 0
    assert capsys.readouterr().out == "def f(" + model.generate_text("def f(", 12, stop=["\n\n"]) + "\n"
    assert main(["generate", "dense-tiny", "x"]) == 2  # a preset without trained weights
    assert "no trained weights" in capsys.readouterr().err


def test_eval_perplexity_of_a_file(capsys, checkpoint, tmp_path):
    run, model = checkpoint
    (tmp_path / "doc.txt").write_text("import sys\nprint(sys.argv)\n")
    assert main(["eval", str(run / "final"), "--perplexity", str(tmp_path / "doc.txt"),
                 "--output", str(tmp_path / "out.json")]) == 0
    reported = json.loads((tmp_path / "out.json").read_text())["perplexity"]
    expected = perplexity(model, model.tokenizer, ["import sys\nprint(sys.argv)\n"])
    assert reported["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert f"bits_per_byte {expected.bits_per_byte:.4f}" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 2 and "--tasks and/or --perplexity" in capsys.readouterr().err


def test_chat_streams_replies_through_the_chat_template(capsys, monkeypatch, tmp_path):
    """A 2-step SFT run's export chats: each stdin line a user turn answered greedily under the chat template
    (history included), /reset starting over, the end of input ending with status 0."""
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What does f{i} do?"}, {"role": "assistant", "content": f"It does {i}."}]}) + "\n"
        for i in range(6)))
    config = zoo.load_config({
        "model": {"d_model": 32, "n_layers": 1, "max_seq_len": 128, "mixer": {"type": "attention", "n_heads": 4,
                                                                            "n_kv_heads": 2},
                  "ffn": {"type": "mlp", "d_hidden": 48}},
        "train": {"objective": {"type": "sft"}, "out_dir": str(tmp_path / "sft"), "max_steps": 2, "batch_size": 2,
                  "val_check_interval": 2, "val_batches": 1, "sample_tokens": 0, "precision": "32-true",
                  "schedule": {"warmup_steps": 1}, "optimizer": {"lr": 0.05},
                  "data": {"format": "chat", "path": str(tmp_path / "chat.jsonl"), "seq_len": 48,
                           "val_fraction": 0.3}}})
    train(config)
    model = zoo.from_pretrained(tmp_path / "sft" / "final").eval()
    tokenizer = model.tokenizer
    assert tokenizer.end_of_turn_id == tokenizer.encode("<|end|>")[0] == 260

    def reply(messages):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return model.generate_text(prompt, 6, stop=[tokenizer.end_of_turn_id])

    question = [{"role": "user", "content": "What does f9 do?"}]
    first = reply(question)
    follow_up = [*question, {"role": "assistant", "content": first}, {"role": "user", "content": "Why?"}]
    second = reply(follow_up)
    prompts = []
    generate_text = model.generate_text
    monkeypatch.setattr(model, "generate_text", lambda prompt, *a, **k: prompts.append(prompt) or generate_text(
        prompt, *a, **k))
    monkeypatch.setattr("zoo.cli.load_model", lambda spec: model if spec == str(tmp_path / "sft") else None)
    monkeypatch.setattr("sys.stdin", io.StringIO("What does f9 do?\nWhy?\n\n/reset\nWhat does f9 do?\n"))
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "sft"), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n(new conversation)\n{first}\n"
    assert prompts == [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                       for m in (question, follow_up, question)]


def test_chat_needs_a_chat_template_and_keeps_the_newest_turns(capsys, checkpoint, monkeypatch):
    run, _ = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(run)]) == 2 and "has no chat template" in capsys.readouterr().err
    tokenizer = with_chat_tokens(ByteTokenizer())
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
             {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"}]
    assert _fitting_prompt(tokenizer, turns, 34)[0] == turns  # all four: 34 tokens; without the first pair: 22
    kept, prompt = _fitting_prompt(tokenizer, turns, 33)
    assert kept == [turns[0], turns[3]]
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\ntwo<|end|>\n<|assistant|>\n"
    assert _fitting_prompt(tokenizer, turns, 10) == (turns[:3], None)


def test_import_a_transformers_checkpoint(capsys, tmp_path):
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(tmp_path / "zoo")(ids).logits, hf(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1


def test_export_writes_the_family_it_chose(capsys, checkpoint, tmp_path):
    import transformers

    run, model = checkpoint
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "transformers model_type 'llama'" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("hi").input_ids == [104, 105]
    assert main(["export", str(run), str(tmp_path / "zoo"), "--format", "zoo"]) == 0
    assert "model_type 'zoo'" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "q"), "--family", "qwen2"]) == 2
    assert "qwen2 cannot represent model.mixer (attention): qkv_bias=False" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "z"), "--family", "llama", "--format", "zoo"]) == 2
    assert main(["export", "retnet-tyni", str(tmp_path / "r")]) == 2
    assert "did you mean retnet-tiny" in capsys.readouterr().err


def test_push_needs_a_checkpoint(capsys, tmp_path):
    assert main(["push", str(tmp_path), "org/repo"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_push_uploads_the_runs_final_export(capsys, checkpoint, monkeypatch):
    """The command resolves the run's export and hands it to upload_checkpoint (whose transfer to a Hub server
    tests/test_hub.py covers; a Hub client here would need its own process, ~40 s on 2 shared cores)."""
    run, _ = checkpoint
    calls = []
    monkeypatch.setattr("zoo.cli.upload_checkpoint", lambda *args, **kwargs: calls.append((args, kwargs)) or "ok")
    assert main(["push", str(run), "org/cli", "--private"]) == 0
    assert calls == [((run / "final", "org/cli"), {"private": True, "revision": None})]
    assert "pushed" in capsys.readouterr().out


def test_train_forwards_to_train_py(capsys):
    assert main(["train", "--config", "dense-tiny", "--print-config", "model.n_layers=3"]) == 0
    assert "n_layers: 3" in capsys.readouterr().out
    assert main(["train", "--config", "no-such-preset", "--print-config"]) == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: zoo " + command in capsys.readouterr().out
