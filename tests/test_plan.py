"""The memory planner (``zoo.train.plan``, ``train.py --plan``): states exact against a real model, activations
against the bytes autograd saves, and the command prints without training."""

import importlib.util
from pathlib import Path

import pytest
import torch

import zoo
from zoo.blocks.experts import CPU_ROW_ALIGN, Experts
from zoo.train.plan import format_bytes, parse_bytes, plan_from_config, plan_memory

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model.vocab_size": 257, "model.d_model": 64}


def saved_bytes(model, ids, bf16: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, return_logits=False)
    return sum(saved.values())


@pytest.mark.parametrize("ep, dp, fsdp", [(1, 1, False), (2, 1, False), (2, 2, True), (1, 4, True)])
def test_parameter_gradient_and_optimizer_bytes_are_exact(ep, dp, fsdp):
    config = zoo.load_config("deepseek-moe-tiny", SMALL)
    model = zoo.build_model(config.model)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    other = model.num_parameters() - experts
    held = -(-(other * (1 if not fsdp else 1 / (dp * ep)) + experts / ep / (dp if fsdp else 1)) // 1)
    for precision, (param, moment) in {"bf16-mixed": (4, 4), "32-true": (4, 4), "bf16-true": (2, 2)}.items():
        plan = plan_memory(config.model, 2, 32, data_parallel=dp, expert_parallel=ep, fsdp=fsdp, precision=precision)
        assert plan.parameters == int(held)
        assert (plan.parameter_bytes, plan.gradient_bytes, plan.optimizer_bytes) == (
            held * param, held * param, 2 * held * moment)
    single = plan_memory(config.model, 2, 32, precision="32-true")
    assert single.parameters == model.num_parameters() and single.parameter_bytes == sum(
        p.numel() * p.element_size() for p in model.parameters())
    # AdamW's state after one step is what the planner says
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (1, 8)), labels=torch.randint(0, 257, (1, 8))).loss.backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert state == single.optimizer_bytes


# Stated tolerances of the activation estimate against the saved-tensor bytes measured on CPU: attention and
# MoE layers are traced exactly (measured error <= 1%); retention saves a little less than its meta trace.
TOLERANCE = {"dense-tiny": 0.03, "deepseek-moe-tiny": 0.03, "retnet-tiny": 0.2, "mtp-tiny": 0.03}


@pytest.mark.parametrize("name", sorted(TOLERANCE))
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_estimate_matches_saved_tensor_bytes(name, precision):
    config = zoo.load_config(name, SMALL)
    model = zoo.build_model(config.model).train()
    measured = saved_bytes(model, torch.randint(0, 257, (4, 128)), precision == "bf16-mixed")
    plan = plan_memory(config.model, 4, 128, precision=precision, expert_row_align=CPU_ROW_ALIGN)
    assert plan.activation_bytes == pytest.approx(measured, rel=TOLERANCE[name])
    recomputed = plan_memory(config.model, 4, 128, precision=precision, activation_checkpointing="full",
                             expert_row_align=CPU_ROW_ALIGN)
    assert recomputed.activation_bytes < 0.6 * plan.activation_bytes


def test_largest_micro_batch_fits_and_the_next_does_not():
    config = zoo.load_config("deepseek-moe-1b")
    plan = plan_from_config(config)
    assert plan.parameters == 1_263_835_136  # the preset's documented size
    device = parse_bytes("80GB")
    best = plan.max_micro_batch(device)
    fits = plan_memory(config.model, best, 2048)
    over = plan_memory(config.model, best + 1, 2048)
    assert fits.total_bytes <= device < over.total_bytes
    assert plan_memory(config.model, 1, 2048, expert_parallel=8, data_parallel=1).parameters < plan.parameters / 4


def test_bad_layouts_and_sizes_are_refused():
    config = zoo.load_config("deepseek-moe-tiny", SMALL)
    with pytest.raises(zoo.ConfigError, match=r"expert_parallel=3 does not divide the experts .* \(16\)"):
        plan_memory(config.model, 1, 32, expert_parallel=3)
    with pytest.raises(zoo.ConfigError, match="not a size such as 80GB"):
        parse_bytes("lots")
    assert parse_bytes("80GB") == parse_bytes("80 GiB") == 80 * 2**30 and format_bytes(1536) == "1.5 KiB"


def test_plan_flag_prints_and_exits_without_training(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setattr("zoo.train.run.train", lambda *a, **k: pytest.fail("--plan must not train"))
    code = entry.main(["--config", "deepseek-moe-tiny", "--plan", "--plan-memory", "2GB",
                       "train.activation_checkpointing=full", "train.trainer.devices=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory plan per rank (dp=2, ep=1, fsdp=False, activation_checkpointing=full" in out
    for row in ("parameters", "gradients", "optimizer state", "activations", "total",
                "largest micro-batch in 2.0 GiB:"):
        assert row in out
