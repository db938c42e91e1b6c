"""The training helper the reproductions share: one preset + overrides, a fixed seed and token budget.

Every reproduction trains its models with ``train_run`` on the same corpus (``python-stdlib``, bytes), with
the same seed, batch, sequence length, steps, warm-up and validation batches (``budget(quick)``), through
zoo's own training code (``zoo.train.run.train``, i.e. exactly what ``python train.py`` does), and reads the
validation curve back from the run's ``metrics.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

# Attention runs on the `eager` backend in the reproductions: the same function as SDPA (tested), and faster for
# these tiny shapes in bf16 on this CPU (dense-tiny step at 8 x 128: 0.086 s eager vs 0.119 s SDPA on a quiet
# machine; under CPU contention SDPA's kernel degraded to ~8x slower, 3.4 s vs 0.43 s).
EAGER_ATTENTION = "model.mixer.backend=eager"


def budget(quick: bool, steps: int | None = None) -> dict:
    """The shared token budget: full mode trains ``steps`` (default 300) steps of 8 x 128 bytes of
    ``python-stdlib`` (sized so that all reproductions fit in ~40 minutes of a shared 2-core CPU); quick mode
    6 steps of 2 x 32 bytes of ``pydoc-topics`` (seconds, for tests)."""
    if quick:
        return {"steps": steps or 6, "batch_size": 2, "seq_len": 32, "corpus": "pydoc-topics", "val_batches": 2}
    return {"steps": steps or 300, "batch_size": 8, "seq_len": 128, "corpus": "python-stdlib", "val_batches": 16}


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] from a Lightning CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(float(row["step"])), float(value)))
    return series


def train_run(preset: str, overrides: list[str], budget: dict, out_dir: Path, evals: int = 10) -> dict:
    """Train ``preset`` with ``overrides`` for ``budget["steps"]`` steps (seed 0), validating ``evals`` times.

    Returns ``val_loss`` (the last validation's LM loss, nats/byte), ``val_loss_curve`` ([(step, loss)]),
    ``metrics`` (every metrics.csv column as [(step, value)]), ``parameters`` and ``active_parameters``.
    """
    from zoo.train.config import load_config
    from zoo.train.run import train

    steps = budget["steps"]
    config = load_config(preset, [
        *overrides, f"train.max_steps={steps}", f"train.batch_size={budget['batch_size']}",
        f"train.data.seq_len={budget['seq_len']}", f"train.data.corpus={budget['corpus']}",
        f"train.val_batches={budget['val_batches']}", f"train.val_check_interval={max(1, steps // evals)}",
        f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 50)}", "train.sample_tokens=0",
        f"train.out_dir={out_dir}", f"train.schedule.warmup_steps={max(1, steps // 10)}", "train.seed=0"])
    result = train(config)
    model = result.module.model
    metrics = read_metrics(Path(out_dir) / "metrics.csv")
    return {"val_loss": result.val_loss, "val_loss_curve": metrics["val/loss"], "metrics": metrics,
            "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True)}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the validation curve reaches ``target`` (linear interpolation between
    evaluations), or None if it never does."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None
