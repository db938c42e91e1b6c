"""Which loss-free balancing rate lets ``deepseek-moe-tiny`` balance within its own run (issue: the paper's gamma).

DeepSeek-V3 (arXiv 2412.19437 §2.1.2, Eq. 16) moves each expert's selection bias by ``gamma * sign(mean load -
load)`` after every step, with gamma = 1e-3 for most of a 14.8T-token run; Wang et al. (arXiv 2408.15664 §4.3)
sweep gamma in {1e-4, 1e-3, 1e-2} over thousands of steps. In a run of a few hundred steps the bias can move
at most ``steps * gamma``, while the sigmoid scores of a freshly trained router spread by tenths: this sweep
measures, for each gamma, the global MaxVio (Wang et al. Eq. 7, validation batches) over the run and the final
validation loss, with three seeds each (mean and min-max band), every other setting of the preset unchanged.

``python -m benchmarks.bench_bias_update_rate [--quick] [--steps N] [--seeds N]``
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._common import plot_path, print_table, save, table
from benchmarks._train import (EAGER_ATTENTION, budget, curve_band, plot_band, reproduction_parser, runs_band,
                               train_run)

RATES = (1e-3, 3e-3, 1e-2, 3e-2)
QUICK_RATES = (1e-3, 3e-2)  # the ends: every code path of the sweep, half the runs


def run(rate: float, b: dict, seed: int, out_dir: Path) -> dict:
    r = train_run("deepseek-moe-tiny", [f"model.ffn.bias_update_rate={rate}", EAGER_ATTENTION], b, out_dir,
                  evals=6, seed=seed)
    curve = r["metrics"]["val/maxvio"]
    return {"val_loss": r["val_loss"], "maxvio_curve": curve, "maxvio_first": curve[0][1], "maxvio": curve[-1][1],
            "maxvio_min": min(v for _, v in curve)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rate, seeds in results.items():
        plot_band(left, curve_band([r["maxvio_curve"] for r in seeds]), f"gamma {rate:g}", marker="o")
        loss = runs_band(seeds)
        right.errorbar([rate], [loss["mean"]], yerr=[[loss["mean"] - loss["min"]], [loss["max"] - loss["mean"]]],
                       fmt="o", color=left.get_lines()[-1].get_color(), capsize=4)
    left.set(xlabel="step", ylabel="MaxVio_global (validation)", yscale="log",
             title="Load imbalance over the run (mean, min-max band over seeds)")
    right.set(xlabel="bias_update_rate (gamma)", ylabel="final validation loss (nats/byte)", xscale="log",
              title="Final validation loss (mean, min-max over seeds)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: dict, b: dict) -> str:
    falling = [rate for rate, r in rows.items() if r["maxvio"]["max"] < r["first"]["min"]]
    best = min(rows, key=lambda rate: rows[rate]["maxvio"]["mean"])
    paper = rows[min(rows)]
    return (f"Over {b['steps']} steps, MaxVio_global fell from its first evaluation to its last for every seed at "
            f"gamma {', '.join(f'{r:g}' for r in falling) or '(none)'}; the lowest final MaxVio is at gamma "
            f"{best:g} ({rows[best]['maxvio']['mean']:.2f}, range {rows[best]['maxvio']['min']:.2f}-"
            f"{rows[best]['maxvio']['max']:.2f}) against {paper['maxvio']['mean']:.2f} at the paper's "
            f"{min(rows):g}, with final validation loss {rows[best]['loss']['mean']:.3f} vs "
            f"{paper['loss']['mean']:.3f} nats/byte. Mean and min-max over {len(next(iter(rows.values()))['loss']['values'])} seeds.")


def main() -> None:
    args = reproduction_parser(__doc__).parse_args()
    b = budget(args.quick, args.steps)
    seeds = range(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        results = {rate: [run(rate, b, seed, Path(tmp) / f"{rate:g}-{seed}") for seed in seeds]
                   for rate in (QUICK_RATES if args.quick else RATES)}
    rows = {rate: {"first": runs_band(rs, "maxvio_first"), "maxvio": runs_band(rs, "maxvio"), "loss": runs_band(rs)}
            for rate, rs in results.items()}
    columns = ["bias_update_rate", "MaxVio_global, first eval", "MaxVio_global, final", "final val loss"]
    table_rows = [[rate, r["first"], r["maxvio"], r["loss"]] for rate, r in rows.items()]
    print_table(columns, [[row[0]] + [f"{c['mean']:.3f} ({c['min']:.3f}-{c['max']:.3f})" for c in row[1:]]
                          for row in table_rows])
    name = "bench_bias_update_rate" + ("_quick" if args.quick else "")
    png = plot_path(name)
    plot(results, png)
    path = save(name, {"quick": args.quick, **b, "seeds": list(seeds), "results": {f"{k:g}": v for k, v in results.items()},
                       "table": table(f"deepseek-moe-tiny, gamma sweep: {b['steps']} steps of {b['batch_size']} x "
                                      f"{b['seq_len']} bytes of {b['corpus']}, seeds {list(seeds)} (mean, min-max)",
                                      columns, table_rows),
                       "reading": reading(rows, b), "plots": [png.name]})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
