"""Shared pieces of the benchmark scripts: machine facts, the bf16 matmul peak, timing, results files.

Results convention (read by ``benchmarks/_render.py`` to write ``RESULTS.md``). Every script saves one JSON
payload with ``save(name, payload)``; ``save`` adds ``benchmark`` (the name) and ``machine``. Beside its own
keys, a payload may carry (all optional, so older payloads still render):

- ``table``: ``{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...]}`` -- the headline table, every
  row as wide as ``columns``. A cell is a number, a string, ``None`` (rendered blank) or a ``summary()`` dict
  (rendered ``median (min-max)``). Ratios against the peer measured in the same run go in their own column.
  Build it with ``table()``. ``tables``: a list of further tables of the same form.
- ``reading``: one paragraph interpreting the numbers, composed from the measured values (never hard-coded).
- ``plots``: PNG file names, relative to the results directory.
- ``quick``: true for a ``--quick`` pass.

Results go to ``RESULTS``: the directory in ``$ZOO_BENCH_RESULTS`` when set (``python -m benchmarks`` sets it),
else ``benchmarks/results`` -- or ``benchmarks/.quick`` when the script runs with ``--quick``, so a quick pass,
even of one script alone, never overwrites the committed full results.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_ENV = "ZOO_BENCH_RESULTS"
RESULTS = Path(os.environ.get(RESULTS_ENV)
               or Path(__file__).resolve().parent / (".quick" if "--quick" in sys.argv[1:] else "results"))


def machine() -> dict:
    """CPU model, logical cores, torch threads, torch and Python versions, CUDA device name (or None)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def matmul_peak_flops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each run ``repeats`` times, interleaved (a, b, a, b, ...) so machine load hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            out[name].append(run())
    return out


def training_stepper(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
                     bf16: bool = True, **forward_kwargs) -> Callable[[], float]:
    """A timed training step: ``run()`` does ``steps`` x (forward with ``labels=ids`` + backward + optimizer
    step) under CPU bf16 autocast (float32 throughout with ``bf16=False``) and returns tokens/s;
    ``run.step()`` is one untimed step. One warm-up step (allocator, autocast caches, optimizer state) runs
    first."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, **forward_kwargs).loss
        loss.backward()
        optimizer.step()

    step()

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * ids.numel() / (time.perf_counter() - start)

    run.step = step
    return run


def zoo_training_stepper(model, ids: torch.Tensor, steps: int, bf16: bool = True) -> Callable[[], float]:
    """:func:`training_stepper` for a zoo model as ``zoo.train`` trains it: its optimizer (AdamW groups,
    fused kernel) and its forward (``return_logits=False``: the head fused with the loss)."""
    from zoo.train.config import OptimizerConfig
    from zoo.train.module import make_optimizer

    optimizer = make_optimizer(model, OptimizerConfig())
    return training_stepper(model, ids, optimizer, steps, bf16, return_logits=False)


def peer_training_stepper(model, ids: torch.Tensor, steps: int, bf16: bool = True) -> Callable[[], float]:
    """:func:`training_stepper` for a transformers model as its ``Trainer`` trains it by default
    (``optim="adamw_torch_fused"``)."""
    return training_stepper(model, ids, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), steps, bf16)


def cpu_precision() -> str:
    """What ``train.precision: auto`` trains with on this CPU: ``bf16-mixed`` or ``32-true``."""
    from zoo.train.precision import resolve_precision  # here, not at the top: bench_import times zoo's import

    return resolve_precision("auto", "cpu")[0]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def scaled(s: dict, factor: float) -> dict:
    """A ``summary()`` dict's median, min and max times ``factor`` (e.g. seconds -> ms), for a table cell."""
    return {key: s[key] * factor for key in ("median", "min", "max")}


def table(title: str, columns: list[str], rows: list[list]) -> dict:
    """The ``table`` entry of a results payload (see the module docstring); checks every row's width."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table {title!r}: row {row!r} has {len(row)} cells for {len(columns)} columns")
    return {"title": title, "columns": list(columns), "rows": [list(row) for row in rows]}


def save(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir or RESULTS>/<name>.json``: ``{"benchmark": name, "machine": machine(), **payload}``."""
    results_dir = results_dir or RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2))
    return path


def plot_path(name: str) -> Path:
    """Where the PNG of benchmark ``name`` goes (beside its JSON); creates the results directory."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def bar_plot(name: str, title: str, panels: list[tuple[str, str, dict]]) -> str:
    """Save ``RESULTS/<name>.png``: one bar chart per ``(panel title, y label, {bar label: summary() or
    number})``, medians with min-max whiskers; returns the file name (for the payload's ``plots``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, ylabel, bars) in zip(axes[0], panels):
        cells = [v if isinstance(v, dict) else {"median": v, "min": v, "max": v} for v in bars.values()]
        medians = [c["median"] for c in cells]
        ax.bar(range(len(cells)), medians, yerr=[[m - c["min"] for m, c in zip(medians, cells)],
                                                 [c["max"] - m for m, c in zip(medians, cells)]], capsize=4)
        for i, m in enumerate(medians):
            ax.text(i + 0.08, m, f"{m:,.3g}", ha="left", va="bottom", fontsize=8)
        ax.set_xticks(range(len(cells)), [label.replace(" ", "\n", 1) for label in bars], fontsize=8)
        ax.set(title=panel, ylabel=ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    path = plot_path(name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _text(cell) -> str:
    """A printed cell: floats to 3 significant digits, a ``summary()`` or seed-band dict as ``centre (min-max)``."""
    if isinstance(cell, dict):
        centre = cell["median"] if "median" in cell else cell["mean"]
        return f"{centre:,.3g} ({cell['min']:,.3g}-{cell['max']:,.3g})"
    return f"{cell:,.3g}" if isinstance(cell, float) else str(cell)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[_text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
