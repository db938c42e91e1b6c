"""A run's directory: unique default names, the refusal to start a new run over an old one, and the lock a
run holds on its directory for its whole life."""

from __future__ import annotations

import errno
import os
import shutil
from datetime import datetime
from pathlib import Path

from zoo.errors import ConfigError

LOCK_FILE = ".zoo-run.lock"
# What a finished or interrupted run leaves in its directory; a new run there would replace or mix with it.
RUN_OUTPUTS = ("checkpoints/last.ckpt", "metrics.csv", "final/config.json")


def new_run_dir(base: Path) -> Path:
    """Create and return a fresh ``base/<%Y%m%d-%H%M%S-%f>``; names sort by start time, and two runs started
    in the same microsecond still get two directories (the one that loses the ``mkdir`` picks the next name)."""
    base.mkdir(parents=True, exist_ok=True)
    while True:
        path = base / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def previous_outputs(out_dir: Path) -> list[str]:
    """The files of an earlier run in ``out_dir`` (relative paths, from :data:`RUN_OUTPUTS`)."""
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]  # last.ckpt: a directory when sharded


def check_reusable(out_dir: Path, resume: bool | str, overwrite: bool) -> None:
    """Raise ConfigError when ``out_dir`` holds another run and neither ``train.resume`` nor
    ``train.overwrite`` says what to do with it."""
    if resume is not False or overwrite:
        return
    found = previous_outputs(out_dir)
    if found:
        raise ConfigError(f"train.out_dir={str(out_dir)!r} holds another run ({', '.join(found)}); set "
                          "train.resume=true to continue it, train.overwrite=true to replace it, or choose another "
                          "train.out_dir (unset, it is a new runs/<preset>/<time> directory)")


def clear_outputs(out_dir: Path) -> None:
    """Remove the checkpoint and metrics of an earlier run (``train.overwrite=true``), so that they cannot mix
    with the new run's; ``final/`` is replaced when the new run exports."""
    for name in ("checkpoints/last.ckpt", "metrics.csv"):
        path = out_dir / name
        if path.is_dir():  # a sharded checkpoint (train.parallel)
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class RunLock:
    """``out_dir/.zoo-run.lock``, created exclusively and holding the owner's pid, for the run's life.

    A second run into the same directory fails at once naming that pid; a lock whose process no longer
    exists (a run killed hard) is taken over. Only the launching process takes it: the processes
    Lightning's DDP re-launches into the directory do not."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_pid(self.path)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    raise ConfigError(f"train.out_dir={str(self.path.parent)!r} is in use by another run (pid "
                                      f"{holder}, lock file {self.path}); wait for it to end or choose another "
                                      "train.out_dir") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._held = True
            return self
        raise ConfigError(f"train.out_dir={str(self.path.parent)!r}: could not take the lock {self.path}")

    def release(self) -> None:
        if self._held and _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # vanished, or half-written by a process killed while creating it
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    return True
