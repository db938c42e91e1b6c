"""The LightningModule: optimisation, per-step metrics, validation, and the state a checkpoint resumes.

What a step optimises is the run's objective (``train.objective``, :mod:`zoo.train.objectives`); the
module knows nothing else about the loss. Optimisation: AdamW (Loshchilov & Hutter 2019) without weight
decay on norms, biases and embeddings; linear warmup then cosine decay to ``min_lr_ratio`` (Loshchilov &
Hutter 2017, SGDR Eq. 5 without restarts); gradient clipping and accumulation by Lightning. After each
optimizer step (one whole accumulated batch) every module defining ``on_optimizer_step(all_reduce)`` is
called, ``all_reduce`` summing a tensor over data-parallel ranks. Under ``train.parallel``
(:mod:`zoo.train.parallel`) ``configure_model`` applies expert parallelism and FSDP2, and the module reduces
and clips the gradients of the sharded model itself.
"""

from __future__ import annotations

import math
import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from zoo import registry
from zoo.blocks.norm import RMSNorm
from zoo.model import build_model
from zoo.train.block_wrappers import wrap_blocks
from zoo.train.config import OptimizerConfig, ZooConfig
from zoo.train.metrics import (add_counts, all_reduce_counts, all_reduce_sum, load_fractions, moe_max_violation,
                               perplexity)
from zoo.train.objectives import build_objective
from zoo.train.parallel import ParallelPlan, local, parallelize


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


def make_optimizer(model: nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused (one kernel per step, no temporaries) when every parameter is
    on one CPU or CUDA device and, if sharded (DTensors, :mod:`zoo.train.parallel`), on one device mesh; one
    parameter at a time where they mix meshes or plain tensors, which no multi-tensor kernel takes."""
    devices = {p.device.type for p in model.parameters()}
    meshes = {p.device_mesh if isinstance(p, DTensor) else None for p in model.parameters()}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and len(meshes) == 1
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas,
                                  eps=opt.eps, fused=fused or None, foreach=False if len(meshes) > 1 else None)
    # A fused AdamW offers to unscale fp16 gradients itself, and Lightning then refuses to clip them under
    # mixed precision; declining lets a GradScaler unscale before clipping (bf16 has no scaler at all).
    optimizer._step_supports_amp_scaling = False
    return optimizer


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during
    warmup, then a cosine from 1 down to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ZooLightningModule(L.LightningModule):
    """Trains a :class:`zoo.ZooModel` with the run's objective (``train.objective``).

    Logs (at every ``train.log_every`` steps, straight to the loggers with the optimizer step as x):
    ``train/<name>`` for each of the objective's metrics (for ``causal_lm``: ``loss``, ``lm_loss``,
    ``aux_loss``, ``mtp_loss`` and the blocks' metrics), ``train/lr``, ``train/tokens_per_sec``,
    ``train/maxvio`` for MoE models (the step's global batch; each MoE layer's MaxVio over its own
    experts, averaged over layers); after each validation ``val/loss`` (the objective's evaluation loss,
    for ``causal_lm`` the LM cross-entropy over the validation windows), ``val/ppl`` and ``val/maxvio``
    (loads summed over the validation set), and ``val/<name>`` for the objective's ``eval_metrics``
    (for ``dpo``: the rewards, their margin and accuracy). A batch is whatever the data module gives and the
    objective reads: a ``(B, T)`` tensor of token windows, or a dict of tensors (chat and preference data).

    The decoder blocks of the model it trains are wrapped for ``train.activation_checkpointing`` and
    ``train.compile`` (:func:`zoo.train.block_wrappers.wrap_blocks`; state-dict names unchanged).
    """

    def __init__(self, config: ZooConfig, model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else build_model(config.model)
        wrap_blocks(self.model, config.train.activation_checkpointing, config.train.compile)
        self.objective = build_objective(config.train.objective)
        if callable(getattr(self.objective, "prepare", None)):
            self.objective.prepare(self.model)
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
        self._parallel: ParallelPlan | None = None  # set by configure_model under train.parallel

    def configure_model(self) -> None:
        """Under ``train.parallel`` (Lightning's ModelParallelStrategy), shard the model over the device mesh."""
        if self.config.train.parallel.enabled and self._parallel is None:
            self._parallel = parallelize(self.model, self.device_mesh, self.config.train.parallel)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self._parallel is None or gradient_clip_val is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"train.parallel clips gradients by norm only, not by {gradient_clip_algorithm!r}")
        self._parallel.clip_grad_norm_(self.model.parameters(), gradient_clip_val)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        train = self.config.train
        optimizer = make_optimizer(self.model, train.optimizer)
        sched = train.schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, sched.warmup_steps, train.max_steps, sched.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        for module in self._stepping_modules:
            module.on_optimizer_step(all_reduce_sum)

    def training_step(self, batch, batch_idx: int):
        # A skipped batch must leave no trace: the hooked modules' buffers (what their forward counted, e.g.
        # the router loads that drive loss-free balancing) are put back as they were before it.
        saved = [(m, {n: b.clone() for n, b in m.named_buffers(recurse=False)}) for m in self._stepping_modules
                 ] if self.config.train.skip_nonfinite else []
        out = self.objective(self.model, batch)
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
        self._add_step_sums(out)
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Refuse (or, with ``skip_nonfinite``, skip) an update whose gradients are not finite although its loss
        was: every gradient is dropped, so the optimizer step changes nothing. Under ``train.parallel`` the
        gradients are first reduced over the ranks."""
        if self._parallel is not None:
            self._parallel.reduce_gradients()
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler skips the steps with non-finite gradients itself
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        if not grads:  # a batch skipped for its loss
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # sharded gradients: all agree
        if bool(finite):
            return
        step = self.global_step + 1
        if not self.config.train.skip_nonfinite:
            raise FloatingPointError(
                f"non-finite gradients at step {step} (the loss was finite); the last good checkpoint is kept. "
                "Lower train.optimizer.lr, or set train.skip_nonfinite=true to skip such steps")
        for p in self.model.parameters():
            p.grad = None
        self.skipped_steps += 1
        self.print(f"step {step}: non-finite gradients, update skipped")

    def _check_skipped(self, step: int) -> None:
        """Stop once more than ``train.max_skipped_fraction`` of the steps so far were skipped (one always may)."""
        limit = self.config.train.max_skipped_fraction
        if self.skipped_steps > max(1.0, limit * step):
            raise FloatingPointError(
                f"{self.skipped_steps} of the first {step} steps were skipped for non-finite losses or gradients, "
                f"more than train.max_skipped_fraction={limit}; the last good checkpoint is kept. Lower "
                "train.optimizer.lr, or raise train.max_skipped_fraction")

    def _add_step_sums(self, out) -> None:
        for name, value in out.metrics.items():
            self._step_sums[name] = self._step_sums.get(name, 0) + value.detach().float()
        self._step_micro_batches += 1
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses
        self._tokens += out.tokens
        if out.router_stats:
            self._step_counts = add_counts(self._step_counts, out.router_stats)

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
        if self.skipped_steps:
            self._check_skipped(step)
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
            metrics["train/maxvio"] = moe_max_violation(all_reduce_counts(self._step_counts))
        self._log_metrics(metrics, step)
        if "loss" in means:
            self.log("loss", means["loss"], prog_bar=True, logger=False)
        self.log("tok/s", tokens_per_sec, prog_bar=True, logger=False)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._val_metric_sums: dict[str, torch.Tensor] = {}
        self._val_counts = None

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self.objective(self.model, batch)
        self._val_sums += torch.stack([out.eval_loss.detach().double() * out.eval_weight,
                                       torch.tensor(float(out.eval_weight), dtype=torch.float64, device=self.device)])
        for name, value in out.eval_metrics.items():
            self._val_metric_sums[name] = self._val_metric_sums.get(name, 0) + value.detach().double() * out.eval_weight
        if out.router_stats:
            self._val_counts = add_counts(self._val_counts, out.router_stats)

    def on_validation_epoch_end(self) -> None:
        sums = all_reduce_sum(self._val_sums)
        val_loss = (sums[0] / sums[1]).item()
        metrics = {"val/loss": val_loss, "val/ppl": perplexity(val_loss)}
        if self._val_metric_sums:
            names = sorted(self._val_metric_sums)
            totals = all_reduce_sum(torch.stack([self._val_metric_sums[n] for n in names]))
            metrics.update({f"val/{n}": (total / sums[1]).item() for n, total in zip(names, totals)})
        if self._val_counts is not None:
            counts = all_reduce_counts(self._val_counts)
            metrics["val/maxvio"] = moe_max_violation(counts)
            self.val_expert_load = load_fractions(counts)
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
