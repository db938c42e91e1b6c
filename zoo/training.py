"""Training with Lightning: the LightningModule, its schedule and metrics, checkpoints, and ``train()``.

``train(config)`` runs a whole job: tokenizer and token caches, the model (``vocab_size`` following the
tokenizer when unset), ``lightning.Trainer`` (``train.trainer.*`` passes through: devices, strategy,
...), resumable checkpoints at ``out_dir/checkpoints/last.ckpt``, then the export to ``out_dir/final``
(``save_pretrained`` with ``tokenizer.json``), ``loss.png`` (and ``expert_load.png`` for MoE models)
and a generated sample.

Optimisation: AdamW (Loshchilov & Hutter 2019) without weight decay on norms, biases and embeddings;
linear warmup then cosine decay to ``min_lr_ratio`` (Loshchilov & Hutter 2017, SGDR Eq. 5 without
restarts); gradient clipping and accumulation by Lightning. After each optimizer step (one whole
accumulated batch) every module defining ``on_optimizer_step(all_reduce)`` is called, ``all_reduce``
summing a tensor over data-parallel ranks.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from zoo import registry
from zoo.blocks.norm import RMSNorm
from zoo.blocks.router import max_violation
from zoo.config import ConfigError, ZooConfig
from zoo.data import ZooDataModule
from zoo.factory import build_model

_RUN_DIR_ENV = "ZOO_RUN_DIR"  # hands the resolved out_dir to the processes Lightning's DDP re-launches


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the data-parallel ranks (itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on norms, biases and embeddings (tied ones once).

    Parameters are classified by the module that owns them and their name, never by ``p.ndim``: sharding
    strategies (FSDP) hand the optimizer flattened 1-D parameters, which would all look like biases.
    """
    norms = tuple(registry.lookup("norm", name).block for name in registry.available("norm"))
    no_decay_modules = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, RMSNorm, *norms)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            plain = isinstance(module, no_decay_modules) or name == "bias" or name.endswith("_bias") or "norm" in name
            (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def moe_max_violation(tokens_per_expert: list[torch.Tensor]) -> float:
    """MaxVio (DESIGN §4; Wang et al. 2024, Eq. 7) of each MoE layer over its own experts, averaged over
    the layers; ``tokens_per_expert`` holds one ``(n_experts,)`` count per layer, sizes may differ."""
    return torch.stack([max_violation(counts) for counts in tokens_per_expert]).mean().item()


def _add_counts(total: list[torch.Tensor] | None, counts: list[torch.Tensor]) -> list[torch.Tensor]:
    counts = [c.float() for c in counts]
    return counts if total is None else [t + c for t, c in zip(total, counts)]


def _all_reduce_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer counts summed over ranks, in one collective for all layers."""
    return list(all_reduce_sum(torch.cat(counts)).split([c.numel() for c in counts]))


def _load_fractions(counts: list[torch.Tensor]) -> torch.Tensor:
    """``(layers, max n_experts)`` load fractions; a layer with fewer experts is padded with NaN."""
    load = torch.full((len(counts), max(c.numel() for c in counts)), float("nan"))
    for row, c in zip(load, counts):
        row[:c.numel()] = (c / c.sum()).cpu()
    return load


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during
    warmup, then a cosine from 1 down to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ZooLightningModule(L.LightningModule):
    """Trains a :class:`zoo.ZooModel` on ``(B, T)`` token batches (labels = inputs, shifted by the model).

    Logs (at every ``train.log_every`` steps, straight to the loggers with the optimizer step as x):
    ``train/{loss,lm_loss,aux_loss,mtp_loss,lr,tokens_per_sec}``, ``train/<metric>`` for each block metric,
    ``train/maxvio`` for MoE models (the step's global batch; each MoE layer's MaxVio over its own
    experts, averaged over layers); after each validation ``val/loss`` (LM cross-entropy over the
    validation windows), ``val/ppl`` and ``val/maxvio`` (loads summed over the validation set).
    Absent loss components are logged as 0.
    """

    def __init__(self, config: ZooConfig, model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else build_model(config)
        # The modules with an ``on_optimizer_step`` hook (state counted in forward, e.g. MoE loads), found once.
        self._stepping_modules = [m for m in self.model.modules() if callable(getattr(m, "on_optimizer_step", None))]
        self.val_history: list[tuple[int, float]] = []
        self.val_expert_load: torch.Tensor | None = None  # (moe layers, experts) fractions, NaN-padded
        self.skipped_steps = 0
        self._step_sums: dict[str, torch.Tensor] = {}
        self._step_micro_batches = 0
        self._step_counts: list[torch.Tensor] | None = None  # per MoE layer: (n_experts,) tokens this step
        self._tokens = 0
        self._busy_seconds = 0.0
        self._clock = time.perf_counter()
        self._pending_rng: dict | None = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        train = self.config.train
        opt = train.optimizer
        devices = {p.device.type for p in self.model.parameters()}
        fused = len(devices) == 1 and devices <= {"cpu", "cuda"}  # one kernel per step, no temporaries
        optimizer = torch.optim.AdamW(param_groups(self.model, opt.weight_decay), lr=opt.lr, betas=opt.betas,
                                      eps=opt.eps, fused=fused or None)
        # A fused AdamW offers to unscale fp16 gradients itself, and Lightning then refuses to clip them under
        # mixed precision; declining lets a GradScaler unscale before clipping (bf16 has no scaler at all).
        optimizer._step_supports_amp_scaling = False
        sched = train.schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, sched.warmup_steps, train.max_steps, sched.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        for module in self._stepping_modules:
            module.on_optimizer_step(all_reduce_sum)

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        # A skipped batch must leave no trace: the hooked modules' buffers (what their forward counted, e.g.
        # the router loads that drive loss-free balancing) are put back as they were before it.
        saved = [(m, {n: b.clone() for n, b in m.named_buffers(recurse=False)}) for m in self._stepping_modules
                 ] if self.config.train.skip_nonfinite else []
        out = self.model(batch, labels=batch, return_logits=False)
        finite = torch.isfinite(out.loss.detach()).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # all ranks skip or none
        if not bool(finite):
            step = self.global_step + 1
            if not self.config.train.skip_nonfinite:
                raise FloatingPointError(
                    f"non-finite training loss ({out.loss.item()}) at step {step}; the last good checkpoint "
                    "is kept. Lower train.optimizer.lr, or set train.skip_nonfinite=true to skip such batches")
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
            self.skipped_steps += 1
            self.print(f"step {step}: non-finite loss ({out.loss.item()}), batch skipped")
            return None
        self._add_step_sums(out, batch)
        return out.loss

    def _add_step_sums(self, out, batch: torch.Tensor) -> None:
        values = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, "mtp_loss": out.mtp_loss,
                  **out.metrics}
        for name, value in values.items():
            value = torch.zeros((), device=batch.device) if value is None else value.detach().float()
            self._step_sums[name] = self._step_sums.get(name, 0) + value
        self._step_micro_batches += 1
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses
        self._tokens += batch.numel()
        if out.router_stats:
            self._step_counts = _add_counts(self._step_counts, out.router_stats)

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._last_step = self.global_step
        self._clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.global_step
        if step == self._last_step:
            return  # inside an accumulated batch
        self._last_step = step
        now = time.perf_counter()
        self._busy_seconds += now - self._clock
        self._clock = now
        if step % self.config.train.log_every == 0 or step >= self.config.train.max_steps:
            self._log_step(step)
        self._step_sums, self._step_micro_batches, self._step_counts = {}, 0, None

    def _log_step(self, step: int) -> None:
        names = sorted(self._step_sums)
        if not names:
            return
        world = self.trainer.world_size
        packed = torch.stack([self._step_sums[n] for n in names] + [torch.tensor(float(self._step_micro_batches),
                                                                                  device=self.device)])
        packed = all_reduce_sum(packed)
        means = {n: (packed[i] / packed[-1]).item() for i, n in enumerate(names)}
        tokens_per_sec = self._tokens * world / max(self._busy_seconds, 1e-9)
        self._tokens, self._busy_seconds = 0, 0.0
        metrics = {f"train/{n}": v for n, v in means.items()}
        metrics["train/lr"] = self._step_lr
        metrics["train/tokens_per_sec"] = tokens_per_sec
        if self._step_counts is not None:
            metrics["train/maxvio"] = moe_max_violation(_all_reduce_counts(self._step_counts))
        self._log_metrics(metrics, step)
        self.log("loss", means["loss"], prog_bar=True, logger=False)
        self.log("tok/s", tokens_per_sec, prog_bar=True, logger=False)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._val_counts = None

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = self.model(batch, labels=batch, return_logits=False)
        n_predicted = batch.shape[0] * (batch.shape[1] - 1)
        self._val_sums += torch.stack([out.lm_loss.detach().double() * n_predicted,
                                       torch.tensor(float(n_predicted), dtype=torch.float64, device=self.device)])
        if out.router_stats:
            self._val_counts = _add_counts(self._val_counts, out.router_stats)

    def on_validation_epoch_end(self) -> None:
        sums = all_reduce_sum(self._val_sums)
        val_loss = (sums[0] / sums[1]).item()
        metrics = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 80.0))}
        if self._val_counts is not None:
            counts = _all_reduce_counts(self._val_counts)
            metrics["val/maxvio"] = moe_max_violation(counts)
            self.val_expert_load = _load_fractions(counts)
        step = self.global_step
        if not self.trainer.sanity_checking:
            self.val_history.append((step, val_loss))
            self._log_metrics(metrics, step)
            for logger in self.loggers:
                logger.save()
        self.log("val_loss", val_loss, prog_bar=True, logger=False)

    def on_validation_end(self) -> None:
        self._clock = time.perf_counter()  # tokens/s counts training time only

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zoo"] = {"config": self.config.to_dict(), "rng": _rng_state(), "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("zoo", {})
        self._pending_rng = state.get("rng")
        self.skipped_steps = state.get("skipped_steps", 0)


def _rng_state() -> dict:
    """Python, NumPy and torch RNG states as plain containers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunControl(Callback):
    """Step-boundary actions: atomic ``last.ckpt`` every ``checkpoint_every`` steps and at the end, the stop
    at ``max_steps`` (so that a validation runs there), and Ctrl-C: the first one finishes the current
    step, saves a checkpoint and stops; a second one aborts at once."""

    def __init__(self, checkpoint_dir: Path, checkpoint_every: int, max_steps: int):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.max_steps = max_steps
        self.interrupted = False
        self._stop_requested = False
        self._previous_handler = None
        self._last_step = None

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    def request_stop(self) -> None:
        """What Ctrl-C does: checkpoint and stop after the current optimizer step."""
        self._stop_requested = True

    def _on_sigint(self, signum, frame) -> None:
        print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again aborts)", flush=True)
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        self.request_stop()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handler()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # inside an accumulated batch
        self._last_step = step
        stop = trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False)
        if stop or step >= self.max_steps or step % self.checkpoint_every == 0:
            self.save(trainer)
        if stop:
            self.interrupted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"stopped at step {step}; checkpoint {self.last_checkpoint}", flush=True)
        elif step >= self.max_steps:
            trainer.should_stop = True

    def save(self, trainer) -> None:
        """Write ``last.ckpt`` under a temporary name, then rename it; refuse non-finite weights."""
        finite = all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise FloatingPointError(f"non-finite weights at step {trainer.global_step}; "
                                     f"{self.last_checkpoint} keeps the last good state")
        tmp = self.checkpoint_dir / f".last.ckpt.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.last_checkpoint)
        trainer.strategy.barrier("zoo-checkpoint")


class _ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that an existing ``metrics.csv`` is kept (rows up to ``keep_until_step``)
    instead of deleted, so that a resumed run continues the same file."""

    def __init__(self, save_dir: Path, keep_until_step: int | None):
        super().__init__(save_dir, name="", version="")
        self._keep_until_step = keep_until_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        import csv

        path = Path(self.log_dir) / "metrics.csv"
        rows, keys = [], []
        if self._keep_until_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= self._keep_until_step]
            path.unlink()
        with warnings.catch_warnings():  # its warning that it deletes metrics.csv: it no longer exists
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            experiment = super().experiment
        if rows:
            experiment.metrics_keys = sorted(keys)
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=experiment.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        return experiment


# --------------------------------------------------------------------------- the whole job


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    val_loss: float | None  # the last validation's
    interrupted: bool  # stopped by Ctrl-C (a checkpoint was saved, no export)
    sample: str | None
    module: ZooLightningModule


def resolve_run(config: ZooConfig) -> tuple[Path, Path | None]:
    """``(out_dir, checkpoint to resume from or None)``; fills ``config.train.out_dir``. Raises ConfigError
    for a resume request without a checkpoint, before anything is allocated."""
    train = config.train
    resume_path = None
    if isinstance(train.resume, str):
        resume_path = Path(train.resume).expanduser()
        if not resume_path.is_file():
            raise ConfigError(f"train.resume: checkpoint {train.resume!r} does not exist")
        if train.out_dir is None:
            train.out_dir = str(resume_path.parent.parent)
    if train.out_dir is None:
        base = Path("runs") / (config.name or "custom")
        if train.resume is True:
            previous = sorted(p.parent.parent for p in base.glob("*/checkpoints/last.ckpt"))
            if not previous:
                raise ConfigError(f"train.resume=true: no run with checkpoints/last.ckpt under {base}/; "
                                  "set train.out_dir or give train.resume a checkpoint path")
            train.out_dir = str(previous[-1])
        elif os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            train.out_dir = os.environ[_RUN_DIR_ENV]  # a process re-launched by Lightning's DDP
        else:
            train.out_dir = str(base / datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.environ[_RUN_DIR_ENV] = train.out_dir
    out_dir = Path(train.out_dir)
    if train.resume is True:
        resume_path = out_dir / "checkpoints" / "last.ckpt"
        if not resume_path.is_file():
            raise ConfigError(f"train.resume=true: {resume_path} does not exist")
    return out_dir, resume_path


def check_config(config: ZooConfig) -> None:
    """Checks across model and train keys that only training needs."""
    if config.train.data.seq_len > config.model.max_seq_len:
        raise ConfigError(f"train.data.seq_len={config.train.data.seq_len} exceeds "
                          f"model.max_seq_len={config.model.max_seq_len}")


def train(config: ZooConfig, callbacks: list[Callback] | tuple = ()) -> TrainResult:
    """Run the training job ``config`` describes (see the module docstring); returns what it produced."""
    check_config(config)
    out_dir, resume_path = resolve_run(config)
    train_cfg = config.train
    L.seed_everything(train_cfg.seed, verbose=False)
    datamodule = ZooDataModule(config)
    tokenizer = datamodule.tokenizer
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; leave it unset to follow the tokenizer")
    module = ZooLightningModule(config)

    resume_step = _checkpoint_step(resume_path) if resume_path is not None else None
    loggers = [_ResumableCSVLogger(out_dir, keep_until_step=resume_step)]
    if _tensorboard_available():
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    control = RunControl(out_dir / "checkpoints", train_cfg.checkpoint_every, train_cfg.max_steps)
    trainer = L.Trainer(**trainer_arguments(config, out_dir, loggers, [control, *callbacks]),
                        **train_cfg.trainer.extra)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)

    steps = trainer.global_step
    val_loss = module.val_history[-1][1] if module.val_history else None
    result = TrainResult(out_dir, steps, val_loss, control.interrupted, None, module)
    if not trainer.is_global_zero:
        return result
    plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
    if control.interrupted:
        print(f"resume with: train.out_dir={out_dir} train.resume=true")
        return result
    model = module.model.float().cpu().eval()
    model.save_pretrained(out_dir / "final", extra_files={"tokenizer.json": tokenizer.to_json()},
                          training={"steps": steps, "val_loss": val_loss})
    if config.hub.push:
        from zoo.hub import upload_checkpoint

        upload_checkpoint(out_dir / "final", config.hub.repo_id, commit_message=f"zoo training run: step {steps}")
    if module.val_expert_load is not None:
        plot_expert_load(module.val_expert_load, out_dir / "expert_load.png")
    if train_cfg.sample_tokens > 0:
        result.sample = generate_sample(model, tokenizer, datamodule.prepare().val, train_cfg.sample_tokens,
                                        train_cfg.seed)
        print(f"--- sample (step {steps}) ---\n{result.sample}\n---")
    if val_loss is not None:
        print(f"final validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}) at step {steps}; "
              f"model in {out_dir / 'final'}")
    return result


def trainer_arguments(config: ZooConfig, out_dir: Path, loggers: list, callbacks: list) -> dict:
    """The ``lightning.Trainer`` arguments zoo sets (``zoo.config.TRAINER_ARGS_SET_BY_ZOO`` says from
    which keys); ``train.trainer.extra`` adds others."""
    train_cfg, tc = config.train, config.train.trainer
    return dict(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=tc.strategy,
        precision=train_cfg.precision, max_steps=train_cfg.max_steps,
        accumulate_grad_batches=tc.accumulate_grad_batches, gradient_clip_val=tc.gradient_clip_val,
        val_check_interval=train_cfg.val_check_interval * tc.accumulate_grad_batches,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=loggers, callbacks=callbacks,
        enable_checkpointing=False, use_distributed_sampler=False, log_every_n_steps=train_cfg.log_every,
        default_root_dir=out_dir)


def _checkpoint_step(path: Path) -> int:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"])


def _tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def generate_sample(model, tokenizer, val_tokens: np.ndarray, n_tokens: int, seed: int) -> str:
    """A continuation of the first line of the validation text, sampled at temperature 0.8, top-k 40."""
    prompt_ids = [int(t) for t in val_tokens[:32]]
    text = tokenizer.decode(prompt_ids)
    if "\n" in text.strip("\n"):
        text = text[:text.index("\n", len(text) - len(text.lstrip("\n"))) + 1]
    prompt = torch.tensor([tokenizer.encode(text) or [tokenizer.eot_id]])
    n_tokens = min(n_tokens, model.config.model.max_seq_len - prompt.shape[1])
    generator = torch.Generator().manual_seed(seed)
    ids = model.generate(prompt, max_new_tokens=n_tokens, temperature=0.8, top_k=40, generator=generator)
    return text + tokenizer.decode(ids[0, prompt.shape[1]:].tolist())


def plot_losses(metrics_csv: Path, path: Path) -> None:
    """``train/loss`` and ``val/loss`` against steps, from a run's ``metrics.csv``."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"train/loss": ([], []), "val/loss": ([], [])}
    if metrics_csv.is_file():
        with metrics_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                for name, (xs, ys) in series.items():
                    if row.get(name):
                        xs.append(int(float(row["step"])))
                        ys.append(float(row[name]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o" if name.startswith("val") else None, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(load: torch.Tensor, path: Path) -> None:
    """Heatmap of validation-set load fractions, ``load (moe layers, experts)``; NaN cells (experts a
    layer does not have) stay blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row[~row.isnan()] for row in load]
    sizes = {row.numel() for row in rows}
    uniform = f"{1 / sizes.pop():.3f}" if len(sizes) == 1 else "1/E per layer"
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * load.shape[1] + 2), max(2.5, 0.4 * load.shape[0] + 1.5)))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis")  # NaN: drawn transparent
    ax.set_yticks(range(load.shape[0]))
    ax.set_xticks(range(0, load.shape[1], max(1, load.shape[1] // 16)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (in model order)")
    ax.set_title(f"validation load fraction (uniform {uniform}); MaxVio {moe_max_violation(rows):.3f}",
                 fontsize="medium")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
