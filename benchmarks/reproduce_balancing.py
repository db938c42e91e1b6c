"""Auxiliary-loss-free balancing vs an auxiliary loss, in miniature (Wang et al. 2024, arXiv 2408.15664).

``deepseek-moe-tiny`` trained on ``python-stdlib`` twice with the same seed, data and steps:
(a) ``aux``: the Switch-style load-balancing loss at alpha 1e-3 (the paper's baseline), no bias;
(b) ``loss_free``: the loss-free bias (gamma 1e-3, DeepSeek-V3 Eq. 16), no balancing loss at all.
The paper reports MaxVio_global 0.04 (loss-free) vs 0.72 (aux loss) at equal or better perplexity.
Reports the final validation loss and MaxVio_global of each, and plots MaxVio over steps.

Run from the repository root: ``python -m benchmarks.reproduce_balancing [--quick] [--steps N]``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, print_table, save
from zoo.config import load_config

VARIANTS = {
    "aux": ["model.ffn.loss_free_bias=false", "model.ffn.aux_loss_weight=1e-3", "model.ffn.seq_aux_loss_weight=0"],
    "loss_free": ["model.ffn.loss_free_bias=true", "model.ffn.aux_loss_weight=0", "model.ffn.seq_aux_loss_weight=0"],
}


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] from a Lightning CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(float(row["step"])), float(value)))
    return series


def run(variant: str, steps: int, batch_size: int, seq_len: int, corpus: str, out_dir: Path) -> dict:
    from zoo.training import train

    overrides = VARIANTS[variant] + [
        f"train.max_steps={steps}", f"train.batch_size={batch_size}", f"train.data.seq_len={seq_len}",
        f"train.data.corpus={corpus}", f"train.val_check_interval={max(1, steps // 5)}",
        f"train.checkpoint_every={steps}", "train.sample_tokens=0", f"train.out_dir={out_dir}",
        f"train.schedule.warmup_steps={max(1, steps // 10)}", "train.seed=0"]
    result = train(load_config("deepseek-moe-tiny", overrides))
    metrics = read_metrics(out_dir / "metrics.csv")
    return {"val_loss": result.val_loss, "val_maxvio": metrics["val/maxvio"][-1][1],
            "train_maxvio": metrics.get("train/maxvio", []), "val_maxvio_curve": metrics["val/maxvio"],
            "val_loss_curve": metrics["val/loss"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, r in results.items():
        steps, values = zip(*r["train_maxvio"]) if r["train_maxvio"] else ((), ())
        left.plot(steps, values, label=f"{variant} (train batch)", alpha=0.6)
        left.plot(*zip(*r["val_maxvio_curve"]), "o-", label=f"{variant} (validation, global)")
        right.plot(*zip(*r["val_loss_curve"]), "o-", label=variant)
    left.set(xlabel="step", ylabel="MaxVio", title="Expert load imbalance", yscale="log")
    right.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long pass on a small corpus")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    steps, batch, seq, corpus = ((10, 2, 64, "pydoc-topics") if args.quick
                                 else (args.steps, args.batch_size, args.seq_len, "python-stdlib"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            results[variant] = run(variant, steps, batch, seq, corpus, Path(tmp) / variant)
    print_table(["variant", "val loss", "MaxVio_global"],
                [[v, r["val_loss"], r["val_maxvio"]] for v, r in results.items()])
    name = "reproduce_balancing" + ("_quick" if args.quick else "")
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    path = save(name, {"quick": args.quick, "steps": steps, "batch_size": batch, "seq_len": seq, "corpus": corpus,
                       "paper": {"aux": {"maxvio_global": 0.72}, "loss_free": {"maxvio_global": 0.04}},
                       "results": results, "plot": png.name})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
