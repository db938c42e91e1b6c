"""lm-evaluation-harness (Gao et al. 2023, EleutherAI ``lm-eval``) on zoo models: the registered lm-eval model
``zoo`` and :func:`evaluate`, which runs tasks on a loaded model.

Importing this module imports ``lm_eval`` (the ``zoo[eval]`` extra) and registers the model, after which
``lm_eval --model zoo --model_args pretrained=PATH_OR_REPO,batch_size=8`` works too. Requests are answered by
:mod:`zoo.evaluation.scoring` (log-likelihoods, batched) and :func:`zoo.model.text.generate_text` (generation,
batched with left padding, stopping at the task's ``until`` strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from zoo.checkpoint.pretrained import from_pretrained
from zoo.evaluation.scoring import score_continuations, score_document
from zoo.model.generation import eval_mode
from zoo.model.text import generate_text

DEFAULT_MAX_GEN_TOKS = 256


@register_model("zoo")
class ZooLM(LM):
    """A zoo model (``model``, with ``tokenizer`` or ``model.tokenizer``) or checkpoint (``pretrained``: a
    directory or Hub repo id) as an lm-eval language model."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("ZooLM needs exactly one of model (a ZooModel) and pretrained (a checkpoint path or repo)")
        self.model = from_pretrained(pretrained) if model is None else model
        self.tokenizer = tokenizer or self.model.tokenizer
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer (its checkpoint holds no tokenizer.json): pass tokenizer=")
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is greedy)`` per request; an empty context is the end-of-text token."""
        pairs = [(self.tokenizer.encode(context) or [self.tokenizer.eot_id], self.tokenizer.encode(continuation))
                 for context, continuation in (request.args for request in requests)]
        with eval_mode(self.model):
            return score_continuations(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """``log p(text)`` per request, from the end-of-text token, in rolling windows."""
        with eval_mode(self.model):
            return [score_document(self.model, self.tokenizer.encode(text), self.tokenizer.eot_id, self.batch_size)
                    for (text,) in (request.args for request in requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, sampled) continuations, cut at the first ``until`` string."""
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start:start + self.batch_size]]
            groups: dict[tuple, list[int]] = {}  # requests with the same options decode as one batch
            for i, (_, options) in enumerate(chunk):
                groups.setdefault(_decoding_key(options, self.max_gen_toks), []).append(i)
            texts = [""] * len(chunk)
            for (until, max_new, temperature), rows in groups.items():
                prompts = [chunk[i][0] for i in rows]
                for i, text in zip(rows, generate_text(self.model, self.tokenizer, prompts, max_new, list(until),
                                                       temperature=temperature)):
                    texts[i] = text
            outputs.extend(texts)
        return outputs


def _decoding_key(options: dict, default_max: int) -> tuple:
    until = options.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
    return until, int(options.get("max_gen_toks", default_max)), temperature


def evaluate(model, tasks: Sequence[str], tokenizer=None, include_path: str | Path | None = None,
             batch_size: int = 8, limit: int | float | None = None, num_fewshot: int | None = None,
             bootstrap_iters: int = 1000, log_samples: bool = False, include_defaults: bool = False) -> dict:
    """Run lm-eval ``tasks`` (names, or task YAML files in ``include_path``) on ``model``; returns lm-eval's
    results dict (``results[task][metric]``, and ``samples`` when ``log_samples``)."""
    lm = ZooLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    # Only the given folder is indexed when one is given (indexing the built-in tasks takes ~30 s on 2 cores).
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_path is None or include_defaults)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           bootstrap_iters=bootstrap_iters, log_samples=log_samples)
