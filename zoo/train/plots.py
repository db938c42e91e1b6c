"""The plots a run leaves in its directory: ``loss.png`` and ``expert_load.png``."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import torch

from zoo.train.metrics import moe_max_violation

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def plot_losses(metrics_csv: Path, path: Path) -> None:
    """``train/loss`` and ``val/loss`` against steps, from a run's ``metrics.csv``."""
    series = {"train/loss": ([], []), "val/loss": ([], [])}
    if metrics_csv.is_file():
        with metrics_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                for name, (xs, ys) in series.items():
                    if row.get(name):
                        xs.append(int(float(row["step"])))
                        ys.append(float(row[name]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o" if name.startswith("val") else None, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(load: torch.Tensor, path: Path) -> None:
    """Heatmap of validation-set load fractions, ``load (moe layers, experts)``; NaN cells (experts a
    layer does not have) stay blank."""
    rows = [row[~row.isnan()] for row in load]
    sizes = {row.numel() for row in rows}
    uniform = f"{1 / sizes.pop():.3f}" if len(sizes) == 1 else "1/E per layer"
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * load.shape[1] + 2), max(2.5, 0.4 * load.shape[0] + 1.5)))
    image = ax.imshow(load.numpy(), aspect="auto", cmap="viridis")  # NaN: drawn transparent
    ax.set_yticks(range(load.shape[0]))
    ax.set_xticks(range(0, load.shape[1], max(1, load.shape[1] // 16)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (in model order)")
    ax.set_title(f"validation load fraction (uniform {uniform}); MaxVio {moe_max_violation(rows):.3f}",
                 fontsize="medium")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
