"""``zoo.export``: a zoo model (or a run directory, checkpoint, Hub repo) written as a transformers checkpoint.

``format="transformers"`` writes the ``config.json`` and safetensors of the transformers family that
represents every block option of the model exactly (the first of :data:`AUTOMATIC` without problems, or the
``family`` asked for), which ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no zoo code.
A model no family represents raises :class:`~zoo.errors.ConfigError` naming the config key, block and
option for each candidate family. ``format="zoo"`` writes zoo's own transformers form (``model_type: zoo``,
:mod:`zoo.checkpoint.importers.native`), which any zoo model fits and which transformers loads once zoo is
imported (:mod:`zoo.interop.hf`); ``format="auto"`` takes a family when one fits, else the zoo form.

Beside the weights go ``generation_config.json`` and, when the source has a tokenizer, ``tokenizer.json``
with a ``tokenizer_config.json`` naming its end-of-text token (also the config's ``eos_token_id``). The
directory is written in a hidden sibling and renamed into place, as :func:`zoo.checkpoint.pretrained.
save_pretrained` does, so a crash never leaves half an export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from zoo.checkpoint.files import check_replaceable, replace_dir
from zoo.checkpoint.hub import resolve_checkpoint
from zoo.checkpoint.importers import native
from zoo.checkpoint.pretrained import from_pretrained
from zoo.errors import ConfigError
from zoo.interop.dense import LLAMA, MISTRAL, QWEN2, QWEN3
from zoo.interop.deepseek import DEEPSEEK_V3
from zoo.interop.layout import Family, analyze
from zoo.interop.mapping import ZooTensors
from zoo.interop.sparse import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE
from zoo.model import ZooModel
from zoo.tokenizer import HFTokenizer

logger = logging.getLogger(__name__)

FAMILIES = {f.name: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V3)}
AUTOMATIC = [f for f in FAMILIES.values() if f.automatic]  # tried in this order
FORMATS = ("transformers", "zoo", "auto")
_WRITTEN = {"generation_config.json", "tokenizer_config.json"}


def export(source: ZooModel | str | os.PathLike, path: str | os.PathLike, format: str = "transformers", *,
           family: str | None = None, tokenizer=None, max_shard_size: str | int = "5GB") -> str:
    """Write ``source`` to the directory ``path`` in transformers' format; return the family written
    (``"llama"``, ..., or ``"zoo"`` for zoo's own form).

    ``source``: a :class:`~zoo.ZooModel`, a training run directory (its ``final/`` checkpoint), a checkpoint
    directory (zoo or transformers) or a Hub repo id; a directory's ``tokenizer.json`` is exported with it.
    ``format``: ``"transformers"`` (a transformers family, else a ConfigError naming what none represents),
    ``"zoo"`` (zoo's form, for any model) or ``"auto"`` (a family when one fits, else zoo's form).
    ``family`` names the family instead of choosing it (e.g. ``"mistral"``, whose models llama represents).
    ``tokenizer``: a zoo tokenizer (``to_json()``), a ``tokenizer.json`` path, or None (the source's, if any).
    ``path`` must be new, empty, or an earlier checkpoint directory; it is replaced as a whole.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {', '.join(FORMATS)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family={family!r}; choose one of {', '.join(FAMILIES)}")
    if family is not None and format == "zoo":
        raise ValueError(f"family={family!r} is a transformers family: use format='transformers'")
    model, tokenizer_json = _load_source(source, tokenizer)
    chosen = None if format == "zoo" else choose_family(model, family, fallback=format == "auto")
    name = chosen.name if chosen is not None else native.MODEL_TYPE
    config, state_dict = transformers_checkpoint(model, chosen)
    _write(Path(path), config, state_dict, tokenizer_json, model.config.max_seq_len, max_shard_size)
    logger.info("exported the zoo model as transformers model_type %r to %s", name, path)
    return name


def choose_family(model: ZooModel, family: str | None = None, fallback: bool = False) -> Family | None:
    """The family ``model`` is exported as: ``family`` if given (it must fit), else the first of
    :data:`AUTOMATIC` that represents it exactly. With ``fallback``, None (zoo's form) instead of the
    ConfigError a model no family represents raises."""
    try:
        layout = analyze(model.config)
    except ConfigError as err:
        if fallback:
            return None
        raise ConfigError(f"cannot export to a transformers family: {err}") from None
    candidates = [FAMILIES[family]] if family is not None else AUTOMATIC
    reasons = {}
    for candidate in candidates:
        problems = candidate.all_problems(layout)
        if not problems:
            return candidate
        reasons[candidate] = problems
    if fallback:
        return None
    # Report the families with this model's kind of mixer and FFN (all candidates if none has).
    near = {f: p for f, p in reasons.items() if f.near(layout)} or reasons
    detail = "; ".join(f"{f.name} cannot represent {', '.join(p)}" for f, p in near.items())
    raise ConfigError(f"cannot export to a transformers family: {detail}. Export with format='zoo' (zoo's "
                      "transformers form, loaded after `import zoo`) instead")


def transformers_checkpoint(model: ZooModel, family: Family | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``config.json`` mapping and the tensors of ``model`` in ``family``'s format (zoo's form for None)."""
    state_dict = {k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "head.weight")}
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    if family is None:
        c = model.config
        config = {"model_type": native.MODEL_TYPE, "architectures": ["ZooForCausalLM"], native.CONFIG_KEY: c.to_dict(),
                  "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
                  "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings, "dtype": dtype}
        return config, {native.PREFIX + k: v for k, v in state_dict.items()}
    layout = analyze(model.config)
    tensors = ZooTensors(state_dict, family.name)
    family.tensors(layout, tensors)
    return {**family.hf_config(layout), "dtype": dtype, "torch_dtype": dtype}, tensors.finish()


def _load_source(source, tokenizer) -> tuple[ZooModel, str | None]:
    """The model and the ``tokenizer.json`` text to export (``tokenizer`` first, else the source's own)."""
    text = None
    if isinstance(source, ZooModel):
        model = source
        tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    else:
        directory = Path(source)
        if (directory / "final" / "config.json").is_file():  # a training run's directory
            directory = directory / "final"
        directory = resolve_checkpoint(directory if directory.exists() else str(source))
        model = from_pretrained(directory)
        if tokenizer is None and (directory / "tokenizer.json").is_file():
            text = (directory / "tokenizer.json").read_text()
    if isinstance(tokenizer, (str, os.PathLike)):
        text = Path(tokenizer).read_text()
    elif tokenizer is not None:
        text = tokenizer.to_json()
    return model, text


def _write(path: Path, config: dict, state_dict: dict, tokenizer_json: str | None, max_len: int,
           max_shard_size) -> None:
    generation = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    files = {}
    if tokenizer_json is not None:
        tokenizer = HFTokenizer.from_str(tokenizer_json)
        generation.update(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
        config.update(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id)
        files["tokenizer.json"] = tokenizer_json
        files["tokenizer_config.json"] = json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eot_token,
            "pad_token": tokenizer.eot_token, "model_max_length": max_len, "clean_up_tokenization_spaces": False}, indent=2)
    files["config.json"] = json.dumps(config, indent=2)
    files["generation_config.json"] = json.dumps(generation, indent=2)
    check_replaceable(path, _WRITTEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, content in files.items():
            (staging / name).write_text(content)
        save_torch_state_dict({k: v.contiguous() for k, v in state_dict.items()}, staging,
                              max_shard_size=max_shard_size)
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
