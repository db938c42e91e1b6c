"""The quick suite's runner: every script's ``--quick`` pass in a process of its own, two at a time, each forked
from a process that has already imported torch, zoo, lightning and transformers.

A quick pass computes for a few CPU-seconds, less than a fresh interpreter spends importing those libraries
(~6 s), so ``python -m benchmarks --quick`` starts ``multiprocessing``'s fork server with them preloaded and
forks one worker per script from it: the imports are paid once, and every script still starts from a clean
process (its environment variables, thread count and module state die with it). Each worker runs
``python -m benchmarks.<name> --quick`` as ``__main__`` with one torch thread (two workers share two cores),
its output (file descriptors 1 and 2, so C code's and child processes' too) in ``<log_dir>/<name>.log``, and
reports its wall and CPU time (user + system, its own child processes included) back.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import runpy
import sys
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
JOBS = 2  # workers at a time: the 2 cores the CI suite runs on
PRELOAD = ("torch", "zoo", "zoo.train.run", "transformers", "matplotlib.pyplot", "benchmarks._common",
           "benchmarks._train")


def run_quick(names: list[str], results_dir: Path, log_dir: Path, timeout: float | None,
              jobs: int = JOBS) -> Iterator[tuple[str, int, float, float | None]]:
    """Run every script's quick pass, ``jobs`` at a time; yield ``(name, exit code, wall seconds, CPU seconds)``
    as each finishes. A worker killed by a signal gives its negative signal number and no CPU time; one still
    running after ``timeout`` seconds is killed and gives 124."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    reports = context.SimpleQueue()
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, cpu = list(names), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            worker = context.Process(target=_worker, args=(name, results_dir, log_dir / f"{name}.log", reports),
                                     name=name)
            worker.start()
            running[worker.sentinel] = (worker, time.perf_counter())
        wait(list(running), timeout=1.0)
        for sentinel, (worker, start) in list(running.items()):
            done = worker.exitcode is not None
            overdue = not done and timeout is not None and time.perf_counter() - start > timeout
            if not (done or overdue):
                continue
            if overdue:
                worker.kill()
                with (log_dir / f"{worker.name}.log").open("a") as f:
                    f.write(f"\n(killed: still running after {timeout:g} s)\n")
            worker.join()
            while not reports.empty():
                name, seconds = reports.get()
                cpu[name] = seconds
            del running[sentinel]
            code = 124 if overdue else worker.exitcode
            yield worker.name, code, time.perf_counter() - start, cpu.get(worker.name)


def _worker(name: str, results_dir: Path, log: Path, reports) -> None:
    """A worker's body (see the module docstring); exits with the script's exit code."""
    import torch

    from benchmarks import _common
    from benchmarks._common import RESULTS_ENV

    torch.set_num_threads(1)
    os.environ[RESULTS_ENV] = str(results_dir)
    _common.RESULTS = results_dir
    sys.argv = [f"benchmarks.{name}", "--quick"]
    os.chdir(ROOT)
    with log.open("w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    except Exception:  # noqa: BLE001  (reported as a failed script; the traceback is in its log)
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    reports.put((name, own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime))
    sys.exit(code)
