"""The training helper the reproductions share: one preset + overrides, a fixed seed and token budget.

Every reproduction trains its models with ``train_run`` on the same corpus (``python-stdlib``, bytes), with
the same seed, batch, sequence length, steps, warm-up and validation batches (``budget(quick)``), through
zoo's own training code (``zoo.train.run.train``, i.e. exactly what ``python train.py`` does), and reads the
validation curve back from the run's ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Callable

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


def width_overrides(d_model: int) -> list[str]:
    """A ``dense-tiny``-shaped model (any FFN) at width ``d_model``: 32-wide heads (at least one; half as many
    K/V heads), FFN width 2.75 d (a multiple of 8), eager attention."""
    heads = max(1, d_model // 32)
    return [f"model.d_model={d_model}", f"model.mixer.n_heads={heads}", f"model.mixer.n_kv_heads={max(1, heads // 2)}",
            f"model.ffn.d_hidden={ffn_width(d_model)}", EAGER_ATTENTION]


def ffn_width(d_model: int) -> int:
    """The FFN width :func:`width_overrides` gives a width-``d_model`` model."""
    return 8 * round(2.75 * d_model / 8)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] from a Lightning CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(float(row["step"])), float(value)))
    return series


def train_preset(preset: str, overrides, out_dir: Path, callbacks: tuple = ()):
    """``zoo.train.run.train`` of ``preset`` with ``overrides`` (a list or dict of dotted keys) into ``out_dir``;
    returns its ``TrainResult``. Ctrl-C or SIGTERM stop a run gracefully and ``train`` returns: here they stop
    the calling script too (exit 128 + signal), not just the run it was in."""
    from zoo.train.config import load_config
    from zoo.train.run import train

    overrides = [*overrides, f"train.out_dir={out_dir}"] if isinstance(overrides, list) else {
        **overrides, "train.out_dir": str(out_dir)}
    result = train(load_config(preset, overrides), callbacks)
    if result.interrupted:
        raise SystemExit(128 + result.stop_signal)
    return result


def train_run(preset: str, overrides: list[str], budget: dict, out_dir: Path, evals: int = 10, seed: int = 0,
              callbacks: tuple = ()) -> dict:
    """Train ``preset`` with ``overrides`` for ``budget["steps"]`` steps (``train.seed=seed``), validating
    ``evals`` times; ``callbacks`` (Lightning callbacks) go to ``zoo.train.run.train``.

    Returns ``val_loss`` (the last validation's LM loss, nats/byte), ``val_loss_curve`` ([(step, loss)]),
    ``metrics`` (every metrics.csv column as [(step, value)]), ``parameters`` and ``active_parameters``.
    """
    steps = budget["steps"]
    result = train_preset(preset, [
        *overrides, f"train.max_steps={steps}", f"train.batch_size={budget['batch_size']}",
        f"train.data.seq_len={budget['seq_len']}", f"train.data.corpus={budget['corpus']}",
        f"train.val_batches={budget['val_batches']}", f"train.val_check_interval={max(1, steps // evals)}",
        f"train.checkpoint_every={steps}", f"train.log_every={max(1, steps // 50)}", "train.sample_tokens=0",
        f"train.schedule.warmup_steps={max(1, steps // 10)}", f"train.seed={seed}"], out_dir, callbacks)
    model = result.module.model
    metrics = read_metrics(Path(out_dir) / "metrics.csv")
    return {"val_loss": result.val_loss, "val_loss_curve": metrics["val/loss"], "metrics": metrics,
            "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True),
            "model_config": result.config.to_dict()["model"], "seed": seed}


# --------------------------------------------------------------------------------------------- seeds and bands
# Every reproduction trains each variant once per seed and reports the seed band: the mean over seeds with the
# min-max range (not a standard deviation: with 3 seeds the range is the honest description). A difference
# counts only when two bands are disjoint.

BAND_LABEL = "mean (min–max over seeds)"
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


class ReproductionParser(argparse.ArgumentParser):
    """An argument parser whose ``--seeds`` defaults to ``full_seeds``, or to 1 with ``--quick`` (a quick pass
    checks the plumbing: one seed runs every code path that several do)."""

    def __init__(self, full_seeds: int, **kwargs):
        super().__init__(**kwargs)
        self.full_seeds = full_seeds

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.seeds is None:
            parsed.seeds = 1 if parsed.quick else self.full_seeds
        return parsed


def reproduction_parser(doc: str, seeds: int = 3, steps: bool = True) -> argparse.ArgumentParser:
    """The command line every reproduction shares: ``--quick``, ``--steps N`` (unless ``steps=False``: a
    script that sets each run's steps itself) and ``--seeds N`` (default ``seeds``; 1 with ``--quick``)."""
    parser = ReproductionParser(seeds, description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long pass on a small corpus, one seed")
    if steps:
        parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the script's)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {seeds}; 1 with --quick)")
    return parser


def train_seeds(preset: str, overrides: list[str], budget: dict, out_dir: Path, seeds: int, evals: int = 10,
                callbacks: Callable[[], tuple] = tuple) -> list[dict]:
    """:func:`train_run` once per seed ``0 .. seeds-1`` (each in ``out_dir/seed<k>``); ``callbacks()`` makes a
    fresh set of Lightning callbacks for each run. Returns the runs, in seed order."""
    return [train_run(preset, overrides, budget, Path(out_dir) / f"seed{seed}", evals, seed, callbacks())
            for seed in range(seeds)]


def band(values: list[float]) -> dict:
    """The seed band of ``values`` (one per seed): ``mean``, ``min``, ``max`` and the ``values``."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}


def curve_band(curves: list[list[tuple[int, float]]]) -> dict:
    """The band of several ``[(step, value)]`` curves (one per seed) at the steps they all have:
    ``{"steps", "mean", "min", "max"}`` (lists)."""
    common = sorted(set.intersection(*(set(step for step, _ in c) for c in curves)))
    by_step = [dict(c) for c in curves]
    values = [[d[step] for d in by_step] for step in common]
    return {"steps": common, "mean": [statistics.fmean(v) for v in values], "min": [min(v) for v in values],
            "max": [max(v) for v in values]}


def runs_band(runs: list[dict], key: str = "val_loss") -> dict:
    """:func:`band` of ``run[key]`` over the seeds' runs."""
    return band([r[key] for r in runs])


def order(a: dict, b: dict) -> str:
    """How band ``a`` lies against band ``b``: "below" or "above" when they are disjoint, else "overlap"."""
    if a["max"] < b["min"]:
        return "below"
    if a["min"] > b["max"]:
        return "above"
    return "overlap"


def verdict(status: str, reason: str) -> dict:
    """A reproduction's verdict for the results payload: one of :data:`VERDICTS` and a one-sentence reason."""
    if status not in VERDICTS:
        raise ValueError(f"verdict status {status!r}; allowed: {', '.join(VERDICTS)}")
    return {"status": status, "reason": reason}


def plot_band(ax, cb: dict, label: str, **style) -> None:
    """Draw a :func:`curve_band` on matplotlib ``ax``: the mean as a line, the min-max range shaded."""
    (line,) = ax.plot(cb["steps"], cb["mean"], label=label, **style)
    ax.fill_between(cb["steps"], cb["min"], cb["max"], color=line.get_color(), alpha=0.2, linewidth=0)


def value_at(curve: list[tuple[int, float]], step: float) -> float:
    """A ``[(step, value)]`` curve linearly interpolated at ``step`` (clamped to its ends)."""
    if step <= curve[0][0]:
        return curve[0][1]
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return curve[-1][1]


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
