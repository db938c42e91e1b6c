"""Evaluation (zoo.evaluation): lm-evaluation-harness on local tasks (YAML over JSONL in tests/fixtures/lm_eval,
no download) against the same numbers computed directly from the model's logits, and perplexity per token
and per byte. lm-eval's numbers and the direct ones must agree to 1e-4 (float32 log-probabilities)."""

import importlib
import math
from pathlib import Path

import pytest
import torch

import zoo
from zoo.evaluation.scoring import perplexity, score_document
from zoo.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
TASKS = {
    "zoo_tiny_qa": """output_type: multiple_choice
data: zoo_tiny_qa.jsonl
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc""",
    "zoo_tiny_text": """output_type: loglikelihood_rolling
data: zoo_tiny_text.jsonl
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte""",
    "zoo_tiny_gen": """output_type: generate_until
data: zoo_tiny_qa.jsonl
doc_to_text: "{{question}}"
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n", ")"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match""",
}


def write_tasks(folder: Path) -> Path:
    """The local tasks as lm-eval YAML files in ``folder`` (``dataset_path: json`` over the fixture files)."""
    for name, body in TASKS.items():
        lines = body.splitlines()
        data = next(line.split(": ")[1] for line in lines if line.startswith("data: "))
        rest = "\n".join(line for line in lines if not line.startswith("data: "))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {FIXTURES / data}\n"
            f"test_split: test\n{rest}\n")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No network: the Hub and datasets in offline mode (set before lm-eval imports them, patched after)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_model():
    torch.manual_seed(0)
    model = zoo.create_model("dense-tiny", n_layers=1, d_model=32, max_seq_len=64, init_std=0.2,
                             mixer={"n_heads": 4, "n_kv_heads": 2}, ffn={"d_hidden": 48}).eval()
    model.tokenizer = ByteTokenizer()
    return model


def direct_logprob(model, context: str, continuation: str) -> float:
    tok = model.tokenizer
    ctx, cont = tok.encode(context) or [tok.eot_id], tok.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0, -len(cont):]
    return float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())


def test_lm_eval_local_tasks_equal_direct_log_likelihoods(tmp_path, offline):
    harness = importlib.import_module("zoo.evaluation.harness")
    model = tiny_model()
    out = harness.evaluate(model, list(TASKS), include_path=write_tasks(tmp_path), batch_size=3,
                           bootstrap_iters=0, log_samples=True)
    samples, results = out["samples"], out["results"]

    correct = []
    for sample in samples["zoo_tiny_qa"]:  # every choice's score, and accuracy from the direct argmax
        direct = [direct_logprob(model, ctx, cont) for ctx, cont in sample["arguments"]]
        harness_scores = [resp[0][0] for resp in sample["resps"]]
        assert harness_scores == pytest.approx(direct, abs=1e-4)
        correct.append(int(max(range(len(direct)), key=direct.__getitem__) == sample["doc"]["answer"]))
    assert len(correct) == 4 and results["zoo_tiny_qa"]["acc,none"] == pytest.approx(sum(correct) / 4)

    nll = n_bytes = 0.0
    for sample in samples["zoo_tiny_text"]:  # a whole document from the end-of-text token
        text = sample["doc"]["text"]
        direct = direct_logprob(model, "", text)
        assert sample["resps"][0][0] == pytest.approx(direct, abs=1e-4)
        nll, n_bytes = nll - direct, n_bytes + len(text.encode())
    assert results["zoo_tiny_text"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)

    for sample in samples["zoo_tiny_gen"]:  # greedy, cut at the task's until strings
        prompt = sample["arguments"][0][0]
        assert sample["resps"][0][0] == model.generate_text(prompt, 6, stop=["\n", ")"])


def test_perplexity_per_token_and_per_byte():
    model = tiny_model()
    texts = ["print('héllo')\n", "", "x = 1"]
    result = perplexity(model, model.tokenizer, texts, batch_size=2)
    direct = [direct_logprob(model, "", t) for t in texts if t]
    n_bytes = sum(len(t.encode()) for t in texts)
    assert (result.tokens, result.bytes, result.documents) == (n_bytes, n_bytes, 2)  # bytes: tokens = bytes
    assert result.nll == pytest.approx(-sum(direct), rel=1e-5)
    assert result.per_token == pytest.approx(math.exp(-sum(direct) / n_bytes), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(-sum(direct) / n_bytes / math.log(2), rel=1e-5)
    # Windows shorter than the document: every token is still scored once, with less context.
    ids = model.tokenizer.encode("def f(x):\n    return x * 2\n")
    windowed = score_document(model, ids, model.tokenizer.eot_id, max_len=8)
    assert windowed != pytest.approx(score_document(model, ids, model.tokenizer.eot_id), abs=1e-3)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, model.tokenizer, ["", ""])
