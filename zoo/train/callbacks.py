"""Lightning callbacks and loggers of a run: step-boundary checkpoints and stops, a resumable metrics CSV."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import ModelParallelStrategy

from zoo.checkpoint.files import replace_dir
from zoo.train.parallel import local


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
        """Write ``last.ckpt`` under a temporary name, then rename it; refuse non-finite weights. Under a
        sharding strategy (``train.parallel``) it is a directory, each rank writing its shard, which replaces
        the previous one in one step once every shard is written (a crash before leaves the previous whole)."""
        # Frozen parameters (an adapter's base, NF4 ones included: torchao has no isfinite) cannot have changed.
        finite = all(bool(torch.isfinite(local(p)).all()) for p in trainer.lightning_module.parameters()
                     if p.requires_grad)
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise FloatingPointError(f"non-finite weights at step {trainer.global_step}; "
                                     f"{self.last_checkpoint} keeps the last good state")
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        tmp = self.checkpoint_dir / f".last.ckpt.tmp-{os.getpid()}"
        if sharded and trainer.is_global_zero:
            for stale in self.checkpoint_dir.glob(".last.ckpt.tmp-*"):  # left by a run killed while saving
                _remove(stale)
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the strategy uses rank 0's path on every rank
        except OSError as err:
            written = sum(f.stat().st_size for f in (tmp.rglob("*") if tmp.is_dir() else [tmp]) if f.is_file())
            _remove(tmp)
            needed = _tensor_bytes([trainer.lightning_module.state_dict(),
                                    *(optimizer.state_dict() for optimizer in trainer.optimizers)])
            free = shutil.disk_usage(self.checkpoint_dir).free
            partial = f"; {written:,} bytes were written before the failure" if written else ""
            raise OSError(err.errno, f"could not write the step-{trainer.global_step} checkpoint {str(tmp)!r} "
                                     f"({err.strerror}): it needs about {needed:,} bytes (weights and optimizer "
                                     f"state) and {free:,} are free there{partial}; no partial file is left and "
                                     f"{str(self.last_checkpoint)!r} keeps the previous state") from err
        if trainer.is_global_zero:
            if sharded:
                replace_dir(tmp, self.last_checkpoint)
            else:
                os.replace(tmp, self.last_checkpoint)
        trainer.strategy.barrier("zoo-checkpoint")


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tensor_bytes(state) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples (what a checkpoint of it holds)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that each row reaches ``metrics.csv`` when it is logged (a run killed
    hard keeps every row it logged), an existing file is kept (rows up to ``keep_until_step``) instead of
    deleted, so that a resumed run continues it, and the file is only ever rewritten atomically (a temporary
    file renamed over it), so that a failure or a kill mid-rewrite leaves the old history whole."""

    def __init__(self, save_dir: Path, keep_until_step: int | None):
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=1)
        self._keep_until_step = keep_until_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        rows, keys = [], []
        if path.is_file():
            if self._keep_until_step is not None:
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    keys = list(reader.fieldnames or [])
                    rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= self._keep_until_step]
            if rows:
                write_csv_atomically(path, keys, rows)
            else:
                path.unlink()
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self._experiment = _AtomicExperimentWriter(self.log_dir)
        if rows:
            self._experiment.metrics_keys = sorted(keys)
        return self._experiment


class _AtomicExperimentWriter(ExperimentWriter):
    """Lightning's metrics writer, rewriting the file atomically when new columns appear, and never deleting
    it (:class:`ResumableCSVLogger` decides what an existing file keeps)."""

    def _check_log_dir_exists(self) -> None:
        pass

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        write_csv_atomically(Path(self.metrics_file_path), fieldnames, rows)


def write_csv_atomically(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` through a temporary file, fsynced and renamed over it; on failure the
    temporary file is removed and ``path`` is untouched."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
