"""zoo models inside transformers (``model_type: zoo``, zoo/interop/hf.py): models no transformers family
represents (retention, a retention/attention/MoE hybrid) load with ``AutoModelForCausalLM``, give zoo's logits,
generate zoo's greedy tokens with transformers' ``generate`` one new token per step, run in a pipeline, take a
PEFT LoRA adapter, decode and score left-padded batches as one prompt at a time, and register with transformers
only when it is imported (that ``import zoo`` imports no transformers is checked by tests/test_init.py's
fresh-process test)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import zoo  # noqa: E402
from zoo.interop import registration  # noqa: E402
from zoo.tokenizer import ByteTokenizer  # noqa: E402

MODELS = {"retention": ("retnet-tiny", dict(n_layers=2)), "hybrid": ("hybrid-tiny", {})}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    preset, overrides = MODELS[request.param]
    torch.manual_seed(0)
    model = zoo.create_model(preset, d_model=64, layers={3: {"ffn": {"type": "switch", "n_experts": 4}}}
                             if request.param == "hybrid" else {}, **overrides).eval()
    path = tmp_path_factory.mktemp(request.param)
    assert zoo.export(model, path, format="zoo", tokenizer=ByteTokenizer()) == "zoo"
    return model, path, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_loads_with_the_auto_class_and_gives_zoo_logits_and_loss(exported):
    model, _, hf = exported
    assert type(hf).__name__ == "ZooForCausalLM" and hf.config.model_type == "zoo"
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        out, expected = hf(input_ids=ids, labels=ids), model(ids, labels=ids)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)


def test_generate_equals_zoo_greedy_and_decodes_incrementally(exported):
    model, _, hf = exported
    ids = torch.randint(0, 256, (2, 7))
    fed = []
    hook = hf.model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    with torch.no_grad():
        got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    hook.remove()
    assert torch.equal(got, model.generate(ids, max_new_tokens=6))
    assert fed == [7, 1, 1, 1, 1, 1]  # the prompt once, then one new token per step: the states carry the rest
    torch.manual_seed(1)
    sampled = hf.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, temperature=0.8)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :7], ids)


def test_pipeline_and_saving_with_transformers(exported, tmp_path):
    model, path, hf = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=tokenizer)
    text = pipe("hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    expected = model.generate(torch.tensor([list(b"hello")]), max_new_tokens=5)
    assert text == ByteTokenizer().decode(expected[0].tolist())
    hf.save_pretrained(tmp_path / "saved")  # transformers' own save loads back into zoo unchanged
    again = zoo.from_pretrained(tmp_path / "saved")
    assert again.config == model.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_peft_lora_on_the_zoo_linears_trains(exported):
    peft = pytest.importorskip("peft")
    _, path, _ = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["qkv", "proj", "out", "gate_up", "down"]))
    out = lora(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert torch.allclose(out.logits, before, atol=1e-6)  # LoRA starts as the identity (B = 0)
    out.loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads) and all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def left_padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, each ``(B, longest)``, of 1-D ``prompts`` padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((T - len(p),), pad_id), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), torch.ones_like(p)]) for p in prompts])
    return ids, mask


def test_left_padded_batches_generate_and_score_as_one_by_one(exported):
    """Prompts of different lengths in one left-padded batch (transformers' batched generate): every row
    decodes the tokens it decodes alone, and its logits at the real positions are its logits alone."""
    model, _, hf = exported
    prompts = [torch.randint(0, 256, (7,)), torch.randint(0, 256, (3,)), torch.randint(0, 256, (5,))]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        logits = hf(input_ids=ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = hf.generate(prompt[None], max_new_tokens=5, do_sample=False)
            assert torch.equal(batched[row, ids.shape[1]:], alone[0, len(prompt):])
            assert torch.equal(alone, model.generate(prompt[None], max_new_tokens=5))
            own = hf(input_ids=prompt[None]).logits[0]
            torch.testing.assert_close(logits[row, ids.shape[1] - len(prompt):], own, rtol=1e-5, atol=1e-5)


def test_a_batched_pipeline_gives_the_one_by_one_texts(exported):
    _, path, hf = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=tokenizer)
    prompts = ["hello there", "hi", "zoo"]
    batched = pipe(prompts, batch_size=3, max_new_tokens=4, do_sample=False)
    assert [out[0]["generated_text"] for out in batched] == [
        pipe(p, max_new_tokens=4, do_sample=False)[0]["generated_text"] for p in prompts]


def test_right_padding_without_a_cache_is_accepted_other_masks_are_refused(exported):
    _, _, hf = exported
    ids = torch.randint(0, 256, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, attention_mask=right).logits, hf(input_ids=ids).logits)
        with pytest.raises(ValueError, match="attention_mask must be left padding"):
            hf(input_ids=ids, attention_mask=torch.tensor([[1, 1, 0, 0, 1, 1], [1] * 6]))
        with pytest.raises(ValueError, match="attention_mask must be left padding"):
            hf.generate(ids, attention_mask=right, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_registration_waits_for_the_first_import(monkeypatch, tmp_path):
    """The finder zoo installs when transformers is not yet imported, tried on a stand-in package: importing
    the package runs the registration module right after the package's own code, once."""
    (tmp_path / "fake_transformers").mkdir()
    (tmp_path / "fake_transformers" / "__init__.py").write_text("import sys\nsys.modules[__name__].order = ['package']\n")
    (tmp_path / "fake_registration.py").write_text("import fake_transformers\nfake_transformers.order.append('registered')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registration, "_TRANSFORMERS", "fake_transformers")
    monkeypatch.setattr(registration, "_WRAPPER", "fake_registration")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    registration.register_when_transformers_is_imported()
    registration.register_when_transformers_is_imported()  # a second call adds no second finder
    assert sum(isinstance(f, registration._TransformersFinder) for f in sys.meta_path) == 1
    package = importlib.import_module("fake_transformers")
    assert package.order == ["package", "registered"]
    assert not any(isinstance(f, registration._TransformersFinder) for f in sys.meta_path)


def test_lm_eval_hf_model_scores_the_exported_model(exported, monkeypatch):
    """lm-eval's own ``hf`` model (HFLM, not zoo's registered ``zoo`` model) loads the export through the Auto
    classes and gives zoo's log-likelihoods (lm-eval moves a context's trailing spaces into the continuation)."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, path, _ = exported
    lm = huggingface.HFLM(pretrained=str(path), batch_size=2, device="cpu", dtype="float32")
    requests = [("def f(x):", " return x"), ("import", " os")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)])
    tokenizer = ByteTokenizer()
    for (context, continuation), (score, _) in zip(requests, scores):
        ids = tokenizer.encode(context) + tokenizer.encode(continuation)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
        start = len(tokenizer.encode(context))
        direct = sum(logp[start - 1 + j, t].item() for j, t in enumerate(ids[start:]))
        assert score == pytest.approx(direct, abs=1e-4)


def test_base_model_gives_the_hidden_states_the_head_turns_into_logits(exported):
    """``base_model`` is transformers' base-model contract (what TRL's fused LM head calls): the final norm's
    output, which the output embeddings turn into the wrapper's logits; left padding as in ``forward``."""
    _, _, hf = exported
    ids, mask = left_padded([torch.randint(0, 256, (6,)), torch.randint(0, 256, (4,))])
    with torch.no_grad():
        hidden = hf.base_model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        expected = hf(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(hf.get_output_embeddings()(hidden), expected)
        positions = torch.arange(6).expand(2, 6)
        hf.base_model(ids, position_ids=positions)  # each row from 0: what an unpacked batch passes
        with pytest.raises(ValueError, match="packing=False"):
            hf.base_model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    assert hf.base_model.model is hf.model and "base_model" not in dict(hf.named_children())


def test_gradient_checkpointing_recomputes_blocks_and_changes_no_gradient(exported):
    _, path, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).train()
    ids = torch.randint(0, 256, (2, 9))

    def loss_grads_and_block_calls():
        calls = []
        hooks = [b.mixer.register_forward_pre_hook(lambda *_: calls.append(1)) for b in hf.model.blocks]
        hf.zero_grad()
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        for h in hooks:
            h.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}, len(calls)

    plain = loss_grads_and_block_calls()
    hf.gradient_checkpointing_enable()
    assert hf.is_gradient_checkpointing
    checkpointed = loss_grads_and_block_calls()
    assert checkpointed[2] == 2 * plain[2]  # every block's mixer ran again in backward
    assert torch.equal(checkpointed[0], plain[0]) and checkpointed[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    hf.gradient_checkpointing_disable()
    assert not hf.is_gradient_checkpointing and loss_grads_and_block_calls()[2] == plain[2]


def test_trl_sft_trainer_trains_the_wrapped_model(exported, tmp_path):
    """TRL's ``SFTTrainer`` (its fused LM head through ``base_model``) trains a zoo model, gradient
    checkpointing on or off: the same losses either way, and the weights move. ``ZooTrainerCallback`` moves
    the hybrid's loss-free router biases after each step; without it they stay put."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from zoo.interop.hf import ZooTrainerCallback

    _, path, _ = exported
    data = datasets.Dataset.from_dict({"text": ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n"] * 4})
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}
        before["embed"] = model.model.embed.weight.clone()
        args = trl.SFTConfig(output_dir=str(tmp_path / str(checkpointing)), max_steps=2, per_device_train_batch_size=2,
                             activation_checkpointing=checkpointing, use_cpu=True, report_to=[], logging_steps=1,
                             max_length=32, save_strategy="no", disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[ZooTrainerCallback()] if checkpointing else [])
        trainer.train()
        losses[checkpointing] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        after = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
        assert not torch.equal(model.model.embed.weight, before.pop("embed"))
        for name, bias in before.items():  # moved by gamma per step with the callback, untouched without it
            moved = (after[name] - bias).abs().max().item()
            assert moved == (pytest.approx(2 * 3e-3) if checkpointing else 0.0), name
    assert len(losses[False]) == 2 and all(0 < loss < 10 for loss in losses[False])
    assert ("hybrid" in str(path)) == bool(before)  # the hybrid has loss-free routers, RetNet none
    # checkpointing changes no loss; the callback's moved biases route the hybrid's second step differently
    compared = 1 if before else 2
    assert losses[True][:compared] == pytest.approx(losses[False][:compared], rel=1e-5)
