"""Lightning callbacks and loggers of a run: step-boundary checkpoints and stops, a resumable metrics CSV."""

from __future__ import annotations

import csv
import os
import signal
import threading
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger


class RunControl(Callback):
    """Step-boundary actions: atomic ``last.ckpt`` every ``checkpoint_every`` steps and at the end, the stop
    at ``max_steps`` (so that a validation runs there), and stop signals: the first Ctrl-C (SIGINT) or
    SIGTERM (what ``kill``, schedulers and container runtimes send) finishes the current step, saves a
    checkpoint and stops; a second one of the same signal gets its previous handler (Ctrl-C aborts at once).
    ``stop_signal`` is the signal that stopped the run."""

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint_dir: Path, checkpoint_every: int, max_steps: int):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.max_steps = max_steps
        self.interrupted = False
        self.stop_signal: int | None = None
        self._stop_requested = False
        self._previous_handlers: dict[int, object] = {}
        self._last_step = None

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    def request_stop(self) -> None:
        """What Ctrl-C does: checkpoint and stop after the current optimizer step."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C again aborts" if signum == signal.SIGINT else f"a second {name} is not caught"
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping ({again})", flush=True)
        previous = self._previous_handlers.pop(signum, None)
        if signum == signal.SIGINT and previous in (None, signal.SIG_DFL):
            previous = signal.default_int_handler  # the second Ctrl-C raises KeyboardInterrupt
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self.stop_signal = self.stop_signal or signum
        self.request_stop()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in self.STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handler(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous_handlers.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

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


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that an existing ``metrics.csv`` is kept (rows up to ``keep_until_step``)
    instead of deleted, so that a resumed run continues the same file."""

    def __init__(self, save_dir: Path, keep_until_step: int | None):
        super().__init__(save_dir, name="", version="")
        self._keep_until_step = keep_until_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
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
