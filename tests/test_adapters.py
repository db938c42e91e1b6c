"""Adapters (zoo.adapters): LoRA (Hu et al. 2021, Eq. 3) and DoRA (Liu et al. 2024, Eq. 5) on dense, GQA, fused
and MoE projections, checked against float64 references; the frozen base; switching the adapter off; merging."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters import LoRAExperts, LoRALinear, adapter_disabled, adapter_modules, has_adapter
from zoo.blocks.experts import sort_by_expert
from zoo.train.config import OptimizerConfig
from zoo.train.module import make_optimizer

# Tiny models of three families: dense GQA attention, MoE with shared experts (DeepSeek), retention + MoE hybrid.
TINY = {
    "dense-tiny": dict(d_model=32, n_layers=2, mixer={"n_heads": 4, "n_kv_heads": 2}, ffn={"d_hidden": 48}),
    "deepseek-moe-tiny": dict(d_model=32, n_layers=2, mixer={"n_heads": 4, "n_kv_heads": 2},
                              ffn={"n_experts": 4, "d_hidden": 16, "n_group": 2, "topk_group": 1, "top_k": 2}),
    "hybrid-tiny": dict(d_model=32, n_layers=6, ffn={"d_hidden": 48}),
}


def tiny(preset: str, adapter=None, dtype=torch.float64, seed: int = 0) -> zoo.ZooModel:
    torch.manual_seed(seed)
    model = zoo.create_model(preset, max_seq_len=32, **TINY[preset]).to(dtype).eval()
    if adapter is not None:
        zoo.add_adapter(model, adapter)
    return model


def randomise_adapter(model: zoo.ZooModel, seed: int = 1) -> None:
    """Give every adapter parameter (B included, which starts at zero) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in adapter_modules(model):
            for name in module.adapter_parameter_names():
                p = getattr(module, name)
                noise = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
                p.copy_(p + 0.5 * p.abs() * noise if "magnitude" in name else noise)


def ids(seed: int = 2, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", list(TINY))
@pytest.mark.parametrize("dora", [False, True])
def test_a_fresh_adapter_leaves_the_logits_and_merging_keeps_them(preset, dora):
    x = ids()
    base = tiny(preset)
    model = tiny(preset, {"type": "lora", "r": 4, "alpha": 8, "dora": dora})
    types = {type(m) for _, m in adapter_modules(model)}
    assert LoRALinear in types and (LoRAExperts in types) == (preset != "dense-tiny")
    assert torch.equal(model(x).logits, base(x).logits)  # B = 0 (and m = ||W0||_c) start at the base exactly
    randomise_adapter(model)
    adapted = model(x).logits
    assert (adapted - base(x).logits).abs().max() > 1e-3  # the adapter now changes the function
    with adapter_disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    merged = model.merge_adapter()
    assert not has_adapter(merged) and merged.config.adapter is None
    assert merged.config.to_dict() == base.config.to_dict()
    assert merged.num_parameters(trainable=True) == base.num_parameters()
    torch.testing.assert_close(merged(x).logits, adapted, rtol=0, atol=1e-10)


def test_only_adapter_parameters_train_and_reach_the_optimizer():
    model = tiny("deepseek-moe-tiny", {"type": "lora", "r": 2}, dtype=torch.float32).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert model.num_parameters(trainable=True) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert model.num_parameters(trainable=True) < 0.2 * model.num_parameters()
    x = ids()
    model(x, labels=x).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable  # every factor gets a gradient (A through B's, B directly), nothing else
    optimized = {id(p) for group in make_optimizer(model, OptimizerConfig()).param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trainable}


def test_the_config_key_builds_an_adapted_model_and_bad_values_name_it():
    config = zoo.load_config("dense-tiny", {"model.adapter": {"type": "lora", "r": 2, "targets": ["*mixer.qkv"]}})
    model = zoo.build_model(config)
    assert [name for name, _ in adapter_modules(model)] == [f"blocks.{i}.mixer.qkv" for i in range(4)]
    assert model.config.adapter.options.r == 2
    with pytest.raises(zoo.ConfigError, match=r"model.adapter.type: unknown adapter 'lorra' \(did you mean lora\?\); "
                                              r"registered adapters: lora"):
        zoo.load_config("dense-tiny", {"model.adapter": {"type": "lorra"}})
    with pytest.raises(zoo.ConfigError, match=r"model.adapter: r must be positive, got 0"):
        zoo.load_config("dense-tiny", {"model.adapter": {"type": "lora", "r": 0}})
    with pytest.raises(zoo.ConfigError, match=r"unknown key 'model.adapter.rank'"):
        zoo.add_adapter(tiny("dense-tiny"), {"type": "lora", "rank": 2})
    with pytest.raises(zoo.ConfigError, match=r"model.adapter.targets: \['nothing\*'\] match no nn.Linear"):
        zoo.add_adapter(tiny("dense-tiny"), {"type": "lora", "targets": ["nothing*"]})


def test_adapter_disabled_restores_on_exceptions_and_under_no_grad():
    model = tiny("dense-tiny", {"type": "lora", "r": 2})
    randomise_adapter(model)
    x = ids()
    adapted = model(x).logits
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), adapter_disabled(model):
        raise RuntimeError("inside")
    assert all(m.adapter_enabled for _, m in adapter_modules(model))
    assert torch.equal(model(x).logits, adapted)


def test_fused_projections_get_one_factor_pair_per_logical_projection():
    """q, k, v of GQA attention (and gate, up of SwiGLU) each get their own (A, B): the fused LoRALinear equals
    separate LoRA applied to the split weights, in float64."""
    model = tiny("dense-tiny", {"type": "lora", "r": 3, "alpha": 5.0})
    randomise_adapter(model)
    r, s = 3, 5.0 / 3
    for linear, sizes in ((model.blocks[0].mixer.qkv, (32, 16, 16)), (model.blocks[0].ffn.gate_up, (48, 48))):
        assert linear.parts == sizes and linear.lora_A.shape == (len(sizes) * r, 32)
        x = torch.randn(5, 32, dtype=torch.float64)
        pieces = []
        for p, (W, B) in enumerate(zip(linear.weight.split(sizes), linear.lora_B.split(sizes))):
            A = linear.lora_A[p * r:(p + 1) * r]
            pieces.append(x @ W.T + s * (x @ A.T) @ B.T)
        torch.testing.assert_close(linear(x), torch.cat(pieces, dim=-1), rtol=0, atol=1e-12)


def expert_reference(experts: LoRAExperts, x, indices, weights) -> torch.Tensor:
    """A per-expert Python loop over separate gate / up / down LoRA pairs (DoRA off)."""
    s, r, I = experts.scaling, experts.lora_B_down.shape[2], experts.d_hidden
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(experts.n_experts):
        token, slot = torch.nonzero(indices == e, as_tuple=True)
        h = x[token].double()
        W, A, B = (t[e].double() for t in (experts.gate_up_proj, experts.lora_A_gate_up, experts.lora_B_gate_up))
        gate = h @ W[:I].T + s * (h @ A[:r].T) @ B[:I].T
        up = h @ W[I:].T + s * (h @ A[r:].T) @ B[I:].T
        a = F.silu(gate) * up
        W, A, B = (t[e].double() for t in (experts.down_proj, experts.lora_A_down, experts.lora_B_down))
        y = a @ W.T + s * (a @ A.T) @ B.T
        out.index_put_((token,), y * weights[token, slot, None].double(), accumulate=True)
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_expert_lora_equals_a_per_expert_loop(dtype, atol):
    """float32 runs the grouped GEMMs (torch._grouped_mm), float64 the per-expert fallback; both against the
    float64 loop."""
    model = tiny("deepseek-moe-tiny", {"type": "lora", "r": 2, "alpha": 3.0}, dtype=dtype)
    randomise_adapter(model)
    experts = model.blocks[1].ffn.experts
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 32, generator=generator, dtype=dtype)
    indices = torch.randint(0, 4, (20, 2), generator=generator)
    weights = torch.rand(20, 2, generator=generator)
    out = experts(x, sort_by_expert(indices, weights, 4))
    torch.testing.assert_close(out.double(), expert_reference(experts, x, indices, weights), rtol=0, atol=atol)
    grads = torch.autograd.grad(out.square().sum(), [experts.lora_A_gate_up, experts.lora_B_down])
    assert all(g.abs().sum() > 0 for g in grads)


def test_dora_scales_each_output_row_to_its_magnitude():
    """DoRA (Liu et al. 2024, Eq. 5): W' = m (W0 + s B A) / ||W0 + s B A|| with the norm over each output row
    (peft's axis): every row of the merged weight has norm m."""
    model = tiny("deepseek-moe-tiny", {"type": "lora", "r": 2, "dora": True})
    randomise_adapter(model)
    linear, experts = model.blocks[0].mixer.qkv, model.blocks[1].ffn.experts
    torch.testing.assert_close(linear.merged().weight.norm(dim=1), linear.lora_magnitude, rtol=1e-12, atol=0)
    torch.testing.assert_close(experts.merged().down_proj.norm(dim=2), experts.lora_magnitude_down, rtol=1e-12, atol=0)
    x = torch.randn(4, 32, dtype=torch.float64)
    direction = linear.weight + linear.delta_weight()
    expected = x @ (linear.lora_magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", ["dense-tiny", "hybrid-tiny"])
def test_adapted_models_stay_causal(preset):
    model = tiny(preset, {"type": "lora", "r": 2, "dora": preset == "hybrid-tiny"})
    randomise_adapter(model)
    x = ids(batch=1, length=16)
    changed = x.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 257
    a, b = model(x).logits, model(changed).logits  # float64: earlier positions equal up to rounding (chunking)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-12)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


# --------------------------------------------------------------------------- QLoRA: NF4 bases (torchao)


def test_nf4_round_trip_error_is_within_the_formats_bound():
    """QLoRA §3: each block of 64 weights is scaled by its absmax c and rounded to the nearest NF4 code q_j, so
    |w - c q(w / c)| <= c * max_j (q_{j+1} - q_j) / 2. Double quantisation stores c as an int8 offset from the
    mean of all c, in steps of 2 a / 256 (a: the largest |c - mean| of its group of scales), so the stored c'
    differs from c by at most one step (half a step from rounding, a full one where 128 is clamped to 127), and
    |c q - c' q| <= |c - c'| as |q| <= 1. Bound per weight: c * gap / 2 + 2 a / 256, plus float32 rounding."""
    from zoo.adapters.nf4 import NF4_BLOCK, dense_weight, to_nf4

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * torch.rand(64, 1) * 0.1
    quantized = to_nf4(weight)
    error = (dense_weight(quantized) - weight).abs().view(-1, NF4_BLOCK)  # (blocks, 64)
    absmax = weight.abs().view(-1, NF4_BLOCK).amax(dim=1)  # c per block
    codes = quantized.nf4.sort().values
    assert codes.numel() == 16 and codes[0] == -1 and codes[-1] == 1
    half_gap = (codes.diff().max() / 2).item()
    scale_step = 2 * (absmax - absmax.mean()).abs().view(-1, quantized.scaler_block_size).amax(dim=1) / 256
    bound = absmax * half_gap + scale_step.repeat_interleave(quantized.scaler_block_size) + 1e-6
    assert (error <= bound[:, None]).all(), (error.amax(dim=1) / bound).max()
    assert error.max() > 0.2 * (absmax * half_gap).max()  # a real 4-bit error, not a lossless copy
    assert quantized.quantized_data.dtype == torch.uint8 and quantized.quantized_data.numel() == weight.numel() // 2


def test_qlora_trains_only_the_adapter_and_merges_by_dequantising():
    torch.manual_seed(0)
    model = tiny("dense-tiny", {"type": "lora", "r": 2, "base_quant": "nf4"}, dtype=torch.float32)
    qkv = model.blocks[0].mixer.qkv
    assert type(qkv.weight).__name__ == "NF4Tensor" and not qkv.weight.requires_grad
    randomise_adapter(model)
    x = ids()
    adapted = model(x).logits
    model.train()
    model(x, labels=x).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    dequantized = qkv.weight.get_original_weight().clone()
    merged = model.merge_adapter()
    assert type(merged.blocks[0].mixer.qkv.weight) is torch.nn.Parameter
    torch.testing.assert_close(merged.blocks[0].mixer.qkv.weight, dequantized + qkv.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged(x).logits, adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainable_tokens_replace_their_rows_train_alone_merge_and_reload(tmp_path, tied):
    """``trainable_tokens``: the rows of those ids in the embedding and the logits come from the adapter's
    ``token_rows`` (checked against a float64 base whose weights carry those rows); gradients reach only the
    adapter; merging keeps the logits (1e-10); adapter files hold the rows and reload them exactly."""
    tokens = [3, 250, 256]
    base = zoo.create_model("dense-tiny", max_seq_len=32, tie_embeddings=tied, **TINY["dense-tiny"]).double().eval()
    base.save_pretrained(tmp_path / "base")
    model = zoo.from_pretrained(tmp_path / "base")
    zoo.add_adapter(model, {"type": "lora", "r": 2, "trainable_tokens": tokens}, base=str(tmp_path / "base"))
    x = ids()
    x[:, ::4] = 250
    assert torch.equal(model(x).logits, base(x).logits)  # rows start as the base's
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.embed.token_rows.copy_(torch.randn(3, 32, generator=generator, dtype=torch.float64))
        if not tied:
            model.head.token_rows.copy_(torch.randn(3, 32, generator=generator, dtype=torch.float64))
    reference = zoo.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        reference.embed.weight[tokens] = model.embed.token_rows
        reference.head.weight[tokens] = model.head.rows()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=1e-12)
    with adapter_disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    model.train()(x, labels=x).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "embed.token_rows" in trained and ("head.token_rows" in trained) is not tied
    assert all(".lora_" in n or n.endswith("token_rows") for n in trained)
    model.eval()
    randomise_adapter(model)
    adapted = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["adapter"]["trainable_tokens"]
    assert saved == tokens
    assert torch.equal(zoo.from_pretrained(tmp_path / "adapter").eval()(x).logits, adapted)
    merged = model.merge_adapter()
    assert (merged.head.weight is merged.embed.weight) is tied
    torch.testing.assert_close(merged(x).logits, adapted, rtol=0, atol=1e-10)
    with pytest.raises(zoo.ConfigError, match=r"trainable_tokens: ids \[300\] are not below .* vocab_size 257"):
        zoo.add_adapter(zoo.from_pretrained(tmp_path / "base"), {"type": "lora", "trainable_tokens": [300]})


# --------------------------------------------------------------------------- checkpoints and training


def test_adapter_checkpoints_hold_the_adapter_only_and_reload_exactly(tmp_path):
    base = tiny("deepseek-moe-tiny", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    model = zoo.from_pretrained(tmp_path / "base")
    zoo.add_adapter(model, {"type": "lora", "r": 2, "dora": True}, base=str(tmp_path / "base"))
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model"] == str(tmp_path / "base") and saved["adapter"]["type"] == "lora"
    model.save_pretrained(tmp_path / "adapter")  # an adapter directory is replaced as a whole
    loaded = zoo.from_pretrained(tmp_path / "adapter")
    x = ids()
    assert has_adapter(loaded) and torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)
    assert loaded.num_parameters(trainable=True) == model.num_parameters(trainable=True)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(zoo.CheckpointError, match=r"its base model '.*base' cannot be loaded .* pass base="):
        zoo.from_pretrained(tmp_path / "adapter")


def test_a_two_step_run_with_an_adapter_leaves_the_base_bitwise_unchanged(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from zoo.train.run import train

    class Snapshot(Callback):
        def on_train_start(self, trainer, module):
            self.before = {n: t.clone() for n, t in module.model.state_dict().items()}

    config = zoo.load_config("dense-tiny", {
        "model.vocab_size": None, "model.d_model": 32, "model.n_layers": 1, "model.max_seq_len": 32,
        "model.mixer": {"n_heads": 4, "n_kv_heads": 2}, "model.ffn": {"d_hidden": 64},
        "model.adapter": {"type": "lora", "r": 2},
        "train.data": {"corpus": "pydoc-topics", "seq_len": 16}, "train.batch_size": 2, "train.max_steps": 2,
        "train.val_check_interval": 2, "train.val_batches": 1, "train.log_every": 1, "train.sample_tokens": 0,
        "train.optimizer": {"lr": 0.05}, "train.schedule": {"warmup_steps": 1},
        "train.precision": "32-true", "train.out_dir": str(tmp_path)})
    snapshot = Snapshot()
    result = train(config, callbacks=[snapshot])
    after = result.module.model.state_dict()
    assert result.steps == 2
    base = [n for n in after if ".lora_" not in n]
    assert all(torch.equal(after[n], snapshot.before[n]) for n in base)
    assert not torch.equal(after["blocks.0.mixer.qkv.lora_B"], snapshot.before["blocks.0.mixer.qkv.lora_B"])
    exported = zoo.from_pretrained(tmp_path / "final")  # no base recorded: a full checkpoint keeping model.adapter
    assert exported.config.adapter == result.module.model.config.adapter
    x = ids(length=8)
    assert torch.equal(exported.eval()(x).logits, result.module.model.eval()(x).logits)



def test_an_hf_hub_adapter_loads_its_base_at_the_named_revision(tmp_path, monkeypatch):
    """``zoo.from_pretrained("hf-hub:org/adapter")`` resolves the adapter repo and then the base it names
    (``hf-hub:org/base@REV``) through the Hub download, revision included (downloads served from local dirs)."""
    import zoo.checkpoint.hub as hub

    base = tiny("dense-tiny", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base-v1")
    model = zoo.from_pretrained(tmp_path / "base-v1")
    zoo.add_adapter(model, {"type": "lora", "r": 2}, base="hf-hub:org/base@v1")
    randomise_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    repos = {("org/adapter", None): tmp_path / "adapter", ("org/base", "v1"): tmp_path / "base-v1"}
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision))
        return str(repos[repo_id, revision])

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    loaded = zoo.from_pretrained("hf-hub:org/adapter")
    assert calls == [("org/adapter", None), ("org/base", "v1")] and loaded.adapter_base == "hf-hub:org/base@v1"
    x = ids()
    assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)
