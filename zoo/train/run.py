"""``train(config)``: a whole training job.

The resolved config as ``out_dir/run_config.yaml``, tokenizer and token caches (or chat/preference records,
:mod:`zoo.train.chat_data`), the model (``vocab_size`` following the tokenizer when unset; with
``train.init_from`` the checkpoint's weights, grown by the tokens the run's tokenizer added, an adapter over
them training those rows too), ``lightning.Trainer`` (``train.trainer.*`` passes through: devices, strategy,
...), resumable checkpoints at ``out_dir/checkpoints/last.ckpt``, then the export to ``out_dir/final``
(``save_pretrained`` with ``tokenizer.json`` and ``run_config.yaml``: adapter files naming the base when an
adapter trained over a loaded base, the grown or merged one the run saved as ``out_dir/base`` named
``../base``; under ``train.parallel`` ``last.ckpt`` is a directory of per-rank shards and ``final`` the
weights gathered from them), ``loss.png`` (and ``expert_load.png`` for MoE models) and a generated sample.
The caller's config is never changed: the resolved one (``out_dir``, ``vocab_size``, the ``precision`` chosen
for ``auto``, an adapter's ``trainable_tokens``) is a new object, returned in the result and written.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from zoo.adapters import add_adapter
from zoo.checkpoint.hub import upload_checkpoint
from zoo.errors import ConfigError
from zoo.tokenizer import TOKENIZER_CONFIG
from zoo.train.block_wrappers import unwrap_blocks
from zoo.train.callbacks import ResumableCSVLogger, RunControl
from zoo.train.chat_data import ChatDataModule, chat_sample
from zoo.train.config import ZooConfig
from zoo.train.data import ZooDataModule
from zoo.train.init_from import init_from_base, load_initial_model, with_trainable_tokens
from zoo.train.metrics import perplexity
from zoo.model import build_model
from zoo.train.module import ZooLightningModule
from zoo.train.parallel import ZooModelParallelStrategy, full_state_dict
from zoo.train.plots import plot_expert_load, plot_losses
from zoo.train.precision import resolve_precision
from zoo.train.rundir import RunLock, check_reusable, clear_outputs, new_run_dir

_RUN_DIR_ENV = "ZOO_RUN_DIR"  # hands the resolved out_dir to the processes Lightning's DDP re-launches


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    val_loss: float | None  # the last validation's
    interrupted: bool  # stopped by Ctrl-C or SIGTERM (a checkpoint was saved, no export)
    sample: str | None
    module: ZooLightningModule
    config: ZooConfig  # the resolved config the run used (out_dir, vocab_size and precision filled in)
    stop_signal: int | None = None  # the signal that interrupted it (signal.SIGINT or signal.SIGTERM), if any


def resolve_run(config: ZooConfig) -> tuple[ZooConfig, Path | None]:
    """``(config with train.out_dir resolved, checkpoint to resume from or None)``; ``config`` itself is
    unchanged. Raises ConfigError, before anything is allocated, for a resume request without a checkpoint
    and for a new run into a directory holding another run (unless ``train.overwrite``). An unset out_dir is
    a new directory ``runs/<preset>/<%Y%m%d-%H%M%S-%f>``. The resolved directory is handed to the processes
    Lightning's DDP re-launches through the environment; they reuse it unchecked."""
    train = config.train
    out_dir, resume_path = train.out_dir, None
    if isinstance(train.resume, str):
        resume_path = Path(train.resume).expanduser()
        if not resume_path.exists():
            raise ConfigError(f"train.resume: checkpoint {train.resume!r} does not exist")
        out_dir = out_dir or str(resume_path.parent.parent)
    if out_dir is None:
        base = Path("runs") / (config.name or "custom")
        if train.resume is True:
            previous = sorted(p.parent.parent for p in base.glob("*/checkpoints/last.ckpt"))
            if not previous:
                raise ConfigError(f"train.resume=true: no run with checkpoints/last.ckpt under {base}/; "
                                  "set train.out_dir or give train.resume a checkpoint path")
            out_dir = str(previous[-1])
        elif _relaunched():
            out_dir = os.environ[_RUN_DIR_ENV]
        else:
            out_dir = str(new_run_dir(base))
    if not _relaunched():
        check_reusable(Path(out_dir), train.resume, train.overwrite)
    os.environ[_RUN_DIR_ENV] = out_dir
    if train.resume is True:
        resume_path = Path(out_dir) / "checkpoints" / "last.ckpt"
        if not resume_path.exists():
            raise ConfigError(f"train.resume=true: {resume_path} does not exist")
    return replace(config, train=replace(train, out_dir=out_dir)), resume_path


def _relaunched() -> bool:
    """Whether this is a process Lightning's DDP (or a launcher such as torchrun) started beside rank 0."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def check_config(config: ZooConfig) -> None:
    """Checks across model and train keys that only training needs."""
    if config.train.data.seq_len > config.model.max_seq_len:
        raise ConfigError(f"train.data.seq_len={config.train.data.seq_len} exceeds "
                          f"model.max_seq_len={config.model.max_seq_len}")


def train(config: ZooConfig, callbacks: list[Callback] | tuple = ()) -> TrainResult:
    """Run the training job ``config`` describes (see the module docstring); returns what it produced.
    ``config`` is not changed; ``result.config`` is the resolved one the run used."""
    check_config(config)
    config, resume_path = resolve_run(config)
    if _relaunched():
        return _train(config, resume_path, callbacks)
    with RunLock(Path(config.train.out_dir)):
        if config.train.overwrite:
            clear_outputs(Path(config.train.out_dir))
        return _train(config, resume_path, callbacks)


def _train(config: ZooConfig, resume_path: Path | None, callbacks) -> TrainResult:
    precision, why = resolve_precision(config.train.precision, config.train.trainer.accelerator)
    if precision != config.train.precision:
        config = replace(config, train=replace(config.train, precision=precision))
        if not _relaunched():
            print(f"train.precision: auto -> {precision} ({why})", flush=True)
    out_dir = Path(config.train.out_dir)
    train_cfg = config.train
    L.seed_everything(train_cfg.seed, verbose=False)
    datamodule = ZooDataModule(config) if train_cfg.data.format == "text" else ChatDataModule(config)
    tokenizer = datamodule.tokenizer
    model = None
    saved_base = None  # how the final adapter export names its base, when the run saved it (relative: movable)
    if train_cfg.init_from:  # the checkpoint's weights; rows for tokens the run's tokenizer added (chat markers)
        initial = load_initial_model(config.model, train_cfg.init_from, tokenizer.vocab_size)
        model = initial.model
        config = replace(config, model=replace(config.model, vocab_size=model.config.vocab_size))
        if config.model.adapter is not None:
            adapter = with_trainable_tokens(config.model.adapter, initial.added_tokens)
            config = replace(config, model=replace(config.model, adapter=adapter))
            if initial.changed:  # over a base that is not the checkpoint's: saved beside final/ to be named
                base = str(_save_base(model, out_dir / "base", tokenizer).resolve())
                saved_base = "../base"
            else:
                base = init_from_base(train_cfg.init_from)
            add_adapter(model, adapter, base=base)
    elif config.model.vocab_size is None:
        config = replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size))
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; leave it unset to follow the tokenizer")
    if not _relaunched():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.yaml").write_text(config.to_yaml())
    module = ZooLightningModule(config, model)

    resume_step = _check_resume(resume_path, config, module) if resume_path is not None else None
    loggers = [ResumableCSVLogger(out_dir, keep_until_step=resume_step)]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    control = RunControl(out_dir / "checkpoints", train_cfg.checkpoint_every, train_cfg.max_steps)
    trainer = L.Trainer(**trainer_arguments(config, out_dir, loggers, [control, *callbacks]),
                        **train_cfg.trainer.extra)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)

    steps = trainer.global_step
    val_loss = module.val_history[-1][1] if module.val_history else None
    result = TrainResult(out_dir, steps, val_loss, control.interrupted, None, module, config, control.stop_signal)
    sharded = config.train.parallel.enabled
    state = full_state_dict(module.model) if sharded and not control.interrupted else None  # every rank takes part
    if not trainer.is_global_zero:
        return result
    plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
    if control.interrupted:
        print(f"resume with: train.out_dir={out_dir} train.resume=true")
        return result
    if sharded:
        model = build_model(config.model)
        model.load_state_dict(state)
        model = model.float().eval()
        model.adapter_base = getattr(module.model, "adapter_base", None)  # adapter files, as unsharded runs export
    else:
        model = unwrap_blocks(module.model.float().cpu().eval())  # exported and sampled as a plain model
    data = train_cfg.data
    extra_files = {"tokenizer.json": tokenizer.to_json(), "run_config.yaml": config.to_yaml()}
    if tokenizer.tokenizer_config() is not None:
        extra_files[TOKENIZER_CONFIG] = tokenizer.tokenizer_config()
    model.save_pretrained(out_dir / "final", extra_files=extra_files, adapter_base=saved_base,
                          training={"name": config.name, "steps": steps, "val_loss": val_loss, "corpus": data.corpus,
                                    "tokenizer": data.tokenizer, "seq_len": data.seq_len})
    if config.hub.push:
        upload_checkpoint(out_dir / "final", config.hub.repo_id, commit_message=f"zoo training run: step {steps}")
    if module.val_expert_load is not None:
        plot_expert_load(module.val_expert_load, out_dir / "expert_load.png")
    if train_cfg.sample_tokens > 0 and isinstance(datamodule, ChatDataModule):
        result.sample = chat_sample(model, tokenizer, datamodule.prepare()[1], train_cfg.sample_tokens)
    elif train_cfg.sample_tokens > 0:
        result.sample = generate_sample(model, tokenizer, datamodule.prepare().val, train_cfg.sample_tokens,
                                        train_cfg.seed)
    if result.sample is not None:
        print(f"--- sample (step {steps}) ---\n{result.sample}\n---")
    if val_loss is not None:
        print(f"final validation loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f}) at step {steps}; "
              f"model in {out_dir / 'final'}")
    return result


def _save_base(model, path: Path, tokenizer) -> Path:
    """Save ``model`` (the base an adapter will train over) with the tokenizer as a checkpoint at ``path``."""
    if _relaunched():
        return path
    extra = {"tokenizer.json": tokenizer.to_json(), TOKENIZER_CONFIG: tokenizer.tokenizer_config()}
    return model.save_pretrained(path, extra_files={k: v for k, v in extra.items() if v is not None})


def trainer_arguments(config: ZooConfig, out_dir: Path, loggers: list, callbacks: list) -> dict:
    """The ``lightning.Trainer`` arguments zoo sets (``zoo.train.config.TRAINER_ARGS_SET_BY_ZOO`` says from
    which keys); ``train.trainer.extra`` adds others."""
    train_cfg, tc = config.train, config.train.trainer
    strategy = ZooModelParallelStrategy(train_cfg.parallel) if train_cfg.parallel.enabled else tc.strategy
    return dict(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=strategy,
        precision=train_cfg.precision, max_steps=train_cfg.max_steps,
        accumulate_grad_batches=tc.accumulate_grad_batches, gradient_clip_val=tc.gradient_clip_val,
        val_check_interval=train_cfg.val_check_interval * tc.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=loggers, callbacks=callbacks,
        enable_checkpointing=False, use_distributed_sampler=False, log_every_n_steps=train_cfg.log_every,
        default_root_dir=out_dir)


# Keys that differ between a run and the checkpoint it resumes by their nature.
_RESUME_KEYS = ("train.resume", "train.out_dir", "train.overwrite")


def _check_resume(path: Path, config: ZooConfig, module: ZooLightningModule) -> int:
    """The step of checkpoint ``path``, after printing which config keys differ from those it was saved with;
    ConfigError naming the differing ``model.*`` keys when its tensors do not fit ``module``'s shapes."""
    if path.is_dir() != config.train.parallel.enabled:
        raise ConfigError(f"train.resume: {str(path)!r} is {'a sharded' if path.is_dir() else 'a single-file'} "
                          f"checkpoint, written {'with' if path.is_dir() else 'without'} train.parallel; resume it "
                          f"with the train.parallel keys (and world size) it was saved with")
    checkpoint, saved = _read_resume_checkpoint(path)
    stored = checkpoint.get("zoo", {}).get("config")
    changed = {} if stored is None else {key: values for key, values in _differences(stored, config.to_dict()).items()
                                         if key not in _RESUME_KEYS}
    current = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if saved != current:
        model_keys = [f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items()
                      if key.startswith("model.")]
        tensors = sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))
        raise ConfigError(f"train.resume: {str(path)!r} holds a model of other shapes than this config's "
                          f"({'; '.join(model_keys) or 'no model key differs'}; tensors: {', '.join(tensors[:5])}"
                          f"{' ...' if len(tensors) > 5 else ''}); resume with the model keys it was saved with")
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        print(f"resuming {path} with config keys changed since it was saved: {listed}", flush=True)
    return int(checkpoint["global_step"])


def _read_resume_checkpoint(path: Path) -> tuple[dict, dict[str, tuple]]:
    """The checkpoint dict of ``path`` (tensors memory-mapped) and the shapes of its model tensors. A sharded
    checkpoint (a directory: Lightning's ``meta.pt`` beside the distributed checkpoint's shards) gives its
    ``meta.pt`` and the shapes its DCP metadata records. A checkpoint that torch cannot read, such as one cut
    short by a full disk or a copy, is a ConfigError that names it and says how to go on, raised before
    Lightning would report it as an mmap or zip error of its own."""
    try:
        if path.is_dir():
            checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
            metadata = FileSystemReader(path).read_metadata().state_dict_metadata
            shapes = {key.removeprefix("state_dict."): tuple(item.size) for key, item in metadata.items()
                      if key.startswith("state_dict.") and isinstance(item, TensorStorageMetadata)}
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes = None
        if not (isinstance(checkpoint, dict) and "global_step" in checkpoint):
            raise ValueError(f"it holds a {type(checkpoint).__name__} without global_step")
        if shapes is None:
            shapes = {name: tuple(t.shape) for name, t in checkpoint.get("state_dict", {}).items()}
    except Exception as err:  # a damaged zip, a pickle that ends early, storages cut short
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"train.resume: checkpoint {str(path)!r} is corrupt or truncated and cannot be resumed "
                          f"from ({type(err).__name__}{': ' + detail if detail else ''}); remove it and resume "
                          "from a copy you trust with train.resume=<path>, or start the run afresh with "
                          "train.overwrite=true") from err
    return checkpoint, shapes


def _differences(old, new, prefix: str = "") -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for the leaves of two nested dicts that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for key in [*old, *(k for k in new if k not in old)]:
            out.update(_differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def generate_sample(model, tokenizer, val_tokens: np.ndarray, n_tokens: int, seed: int) -> str:
    """A continuation of the first line of the validation text, sampled at temperature 0.8, top-k 40."""
    prompt_ids = [int(t) for t in val_tokens[:32]]
    text = tokenizer.decode(prompt_ids)
    if "\n" in text.strip("\n"):
        text = text[:text.index("\n", len(text) - len(text.lstrip("\n"))) + 1]
    prompt = torch.tensor([tokenizer.encode(text) or [tokenizer.eot_id]])
    n_tokens = min(n_tokens, model.config.max_seq_len - prompt.shape[1])
    generator = torch.Generator().manual_seed(seed)
    ids = model.generate(prompt, max_new_tokens=n_tokens, temperature=0.8, top_k=40, generator=generator)
    return text + tokenizer.decode(ids[0, prompt.shape[1]:].tolist())
