"""Activation checkpointing and torch.compile per decoder block (``train.activation_checkpointing``,
``train.compile``): validated at load time, no change to losses, gradients or router counts, state dicts
without wrapper prefixes, and a run trained with them exports a model that loads and decodes as a plain one."""

import os
import shutil

import pytest
import torch

import zoo
from zoo.blocks.router import Router
from zoo.train.block_wrappers import decoder_blocks, unwrap_blocks, wrap_blocks
from zoo.train.module import ZooLightningModule
from zoo.train.run import train

MOE = {"model.n_layers": 3, "model.d_model": 32, "model.mixer": {"n_heads": 4, "n_kv_heads": 2},
       "model.ffn": {"d_hidden": 16}, "model.mtp": {"depth": 1, "loss_weight": 0.3}}


def saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (views of one storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(storages.values())


def test_keys_are_validated_at_load_time():
    config = zoo.load_config("dense-tiny")
    assert config.train.activation_checkpointing == "none" and config.train.compile is False
    with pytest.raises(zoo.ConfigError, match=r"train.activation_checkpointing: 'selective' is not allowed; "
                                              r"choose one of none, full"):
        zoo.load_config("dense-tiny", ["train.activation_checkpointing=selective"])
    with pytest.raises(zoo.ConfigError, match=r"train.compile: expected true or false, got 'yes'"):
        zoo.load_config("dense-tiny", {"train.compile": "yes"})


def test_checkpointing_changes_no_loss_gradient_or_router_count():
    """Through the config path (the LightningModule wraps the blocks): float32 losses equal, gradients equal to
    rounding, every MoE layer (the MTP module's too) counts each token once, and less is kept for backward."""
    plain = ZooLightningModule(zoo.load_config("deepseek-moe-tiny", MOE)).model
    config = zoo.load_config("deepseek-moe-tiny", {**MOE, "train.activation_checkpointing": "full"})
    recomputed = ZooLightningModule(config, model=zoo.build_model(config.model)).model
    recomputed.load_state_dict(plain.state_dict())
    assert len(decoder_blocks(recomputed)) == 4  # 3 layers + the MTP module's block
    ids = torch.randint(0, 257, (2, 24))
    outputs = []
    for model in (plain, recomputed):
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=0, atol=0)
    assert len(outputs[1].router_stats) == len(outputs[0].router_stats) == 3  # 2 MoE layers + MTP's, no repeats
    for a, b in zip(outputs[0].router_stats, outputs[1].router_stats):
        assert torch.equal(a, b)
    routers = [[m for m in model.modules() if isinstance(m, Router)] for model in (plain, recomputed)]
    for a, b in zip(*routers):
        assert torch.equal(b.expert_load, a.expert_load) and a.expert_load.sum() > 0
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_bytes(recomputed, ids) < 0.7 * saved_bytes(plain, ids)


def test_wrapped_blocks_keep_state_dict_names_and_unwrap(monkeypatch):
    overrides = {"model.n_layers": 2, "model.d_model": 32, "model.mixer": {"n_heads": 4, "n_kv_heads": 2},
                 "model.ffn": {"d_hidden": 16}, "train.activation_checkpointing": "full",
                 "train.compile": shutil.which("g++") is not None}
    config = zoo.load_config("deepseek-moe-tiny", overrides)
    names = list(zoo.build_model(config.model).state_dict())
    model = ZooLightningModule(config).model
    assert list(model.state_dict()) == names and all("forward" in b.__dict__ for b in decoder_blocks(model))
    assert [n for n, _ in model.named_parameters() if "_orig_mod" in n or "_checkpoint_wrapped" in n] == []
    wrap_blocks(model, "none", compile=False)  # wrapping again replaces the wrappers
    assert not any("forward" in b.__dict__ for b in decoder_blocks(model))
    wrap_blocks(model, "full")
    assert unwrap_blocks(model) is model and not any("forward" in b.__dict__ for b in decoder_blocks(model))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(zoo.ConfigError, match=r"train.compile=true: .* 'no-such-compiler' is not on the PATH"):
        ZooLightningModule(zoo.load_config("deepseek-moe-tiny", {**overrides, "train.compile": True}))


def test_run_with_checkpointing_exports_a_plain_model(tmp_path):
    """A whole train() run with activation checkpointing: the exported model loads into a plain model with the
    trained weights, and decodes (the run's sample) with the same tokens as that plain model."""
    overrides = {"model.vocab_size": None, "model.d_model": 32, "model.n_layers": 1, "model.max_seq_len": 64,
                 "model.mixer": {"n_heads": 4, "n_kv_heads": 2}, "model.ffn": {"type": "mlp", "d_hidden": 64},
                 "train.data": {"corpus": "pydoc-topics", "tokenizer": "bytes", "seq_len": 32},
                 "train.batch_size": 4, "train.max_steps": 2, "train.val_check_interval": 2, "train.val_batches": 1,
                 "train.sample_tokens": 0, "train.precision": "32-true", "train.out_dir": str(tmp_path),
                 "train.activation_checkpointing": "full"}
    result = train(zoo.load_config("dense-tiny", overrides))
    trained = result.module.model
    assert not any("forward" in b.__dict__ for b in decoder_blocks(trained))  # unwrapped for export
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(name.startswith("model.") and "_checkpoint_wrapped" not in name for name in state)
    loaded = zoo.from_pretrained(tmp_path / "final")
    assert list(loaded.state_dict()) == list(trained.state_dict())
    prompt = torch.randint(0, 257, (1, 5))
    torch.testing.assert_close(loaded(prompt).logits, trained(prompt).logits, rtol=0, atol=0)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6), trained.generate(prompt, max_new_tokens=6))


def compile_case(backend: str):
    """Eager and compiled (``backend``) losses and gradients of a minuscule dense model under bf16 autocast."""
    config = zoo.load_config("dense-tiny", {"model.n_layers": 1, "model.d_model": 16, "model.max_seq_len": 16,
                                            "model.mixer": {"n_heads": 2, "n_kv_heads": 1},
                                            "model.ffn": {"d_hidden": 16}})
    eager = zoo.build_model(config.model)
    compiled = wrap_blocks(zoo.build_model(config.model), compile=True, backend=backend)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 257, (2, 8))
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1.6e-2, atol=1e-2)  # bf16: 8 bits of mantissa
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=5e-3)


def test_compiled_blocks_give_the_eager_loss_within_bf16_tolerance():
    """Dynamo capture and AOT autograd (the graphs Inductor would receive), in seconds;
    Inductor itself is the next test and ``benchmarks/bench_scale.py``."""
    compile_case("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend (Inductor) needs g++ on the PATH")
@pytest.mark.skipif(not os.environ.get("ZOO_TEST_INDUCTOR"),
                    reason="a cold Inductor compile takes 1-2 minutes on 2 shared cores; set ZOO_TEST_INDUCTOR=1")
def test_inductor_compiled_blocks_give_the_eager_loss_within_bf16_tolerance():
    compile_case("inductor")
