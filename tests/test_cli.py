"""The ``zoo`` command (zoo.cli), run in-process through ``main(argv)`` on a tiny checkpoint: exit codes,
output, and a clear error naming close matches for a bad model name."""

import json

import pytest
import torch

import zoo
from zoo.cli import COMMANDS, main
from zoo.evaluation.scoring import perplexity
from zoo.tokenizer import ByteTokenizer


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
