"""Predictable scaling, in miniature: fit L(N) = E + A / N^alpha on 4 dense sizes, predict a 5th, then train it.

Kaplan et al. 2020 (arXiv 2001.08361, Eq. 1.1) found the loss a power law in the non-embedding parameter
count N; Hoffmann et al. 2022 (Chinchilla, arXiv 2203.15556, Eq. 2) write ``L(N, D) = E + A/N^alpha +
B/D^beta``, which at a fixed token budget D is ``E' + A/N^alpha``. Here 4 ``dense-tiny``-shaped models
(4 layers, d_model 48, 64, 96, 128) train on ``python-stdlib`` with the same seed, data and token budget;
``E, A, alpha`` are fitted to their final validation losses by least squares (a grid over alpha with the
closed-form linear fit of E and A at each); the loss of a 5th, larger size (d_model 192) is predicted and
saved to the JSON *before* it trains; then it trains and the prediction error is reported.

Run from the repository root: ``python -m benchmarks.reproduce_scaling [--quick] [--steps N]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import zoo
from benchmarks._common import plot_path, print_table, save, table
from benchmarks._train import EAGER_ATTENTION, budget, train_run

FIT_WIDTHS = (48, 64, 96, 128)
PREDICT_WIDTH = 192


def size_overrides(d_model: int) -> list[str]:
    """``dense-tiny`` at width ``d_model``: 32-wide heads (half as many K/V heads), SwiGLU width 2.75 d."""
    heads = d_model // 32
    return [f"model.d_model={d_model}", f"model.mixer.n_heads={heads}", f"model.mixer.n_kv_heads={max(1, heads // 2)}",
            f"model.ffn.d_hidden={8 * round(2.75 * d_model / 8)}", EAGER_ATTENTION]


def non_embedding(run: dict, d_model: int, vocab: int = 257) -> int:
    """Kaplan's N: parameters less the (tied) token embedding."""
    return run["parameters"] - vocab * d_model


def fit_power_law(ns: list[float], losses: list[float]) -> dict:
    """Least-squares ``L = E + A N^-alpha``: for each alpha on a grid (0.005 to 2), E and A in closed form
    (ordinary least squares on x = N^-alpha, A >= 0); returns the alpha with the smallest squared error."""
    best = None
    for i in range(1, 401):
        alpha = 0.005 * i
        xs = [n ** -alpha for n in ns]
        mx, my = sum(xs) / len(xs), sum(losses) / len(losses)
        sxx = sum((x - mx) ** 2 for x in xs)
        a = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx)
        e = my - a * mx
        sse = sum((e + a * x - y) ** 2 for x, y in zip(xs, losses))
        if best is None or sse < best["sse"]:
            best = {"E": e, "A": a, "alpha": alpha, "sse": sse}
    return best


def predict(fit: dict, n: float) -> float:
    return fit["E"] + fit["A"] * n ** -fit["alpha"]


def reading(fit: dict, predicted: float, actual: float, n5: int, losses: list[float]) -> str:
    """The honest one-paragraph interpretation, composed from the measured numbers."""
    err = predicted - actual
    monotone = all(b < a for a, b in zip(losses, losses[1:]))
    edge = (" alpha sits at the edge of the fitted grid, so the four points do not pin the power law down;"
            if fit["alpha"] >= 2.0 or fit["alpha"] <= 0.005 else "")
    return (f"The 4 fitted sizes give L(N) = {fit['E']:.3f} + {fit['A']:.3g} / N^{fit['alpha']:.3f} "
            f"(residual RMS {(fit['sse'] / len(losses)) ** 0.5:.4f} nats/byte); the losses "
            f"{'fall' if monotone else 'do not fall'} monotonically with size;{edge} for the 5th model "
            f"(N = {n5 / 1e6:.2f} M non-embedding parameters) the fit predicted {predicted:.3f} before it trained; it "
            f"reached {actual:.3f}, an error of {err:+.3f} nats/byte ({100 * err / actual:+.1f}%). At a fixed, "
            f"small token budget the larger models are undertrained, so the curve flattens and the fitted E absorbs "
            f"the data term of Hoffmann et al.'s L(N, D); one seed per size.")


def plot(ns: list[int], losses: list[float], fit: dict, n5: int, predicted: float, actual: float | None,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    lo, hi = min(ns) * 0.8, n5 * 1.3
    grid = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    ax.plot(grid, [predict(fit, n) for n in grid], "-", color="gray",
            label=f"fit: {fit['E']:.2f} + {fit['A']:.3g}/N^{fit['alpha']:.2f}")
    ax.plot(ns, losses, "o", label="trained (fitted)")
    ax.plot([n5], [predicted], "x", markersize=10, color="tab:red", label=f"predicted {predicted:.3f}")
    if actual is not None:
        ax.plot([n5], [actual], "s", color="tab:green", label=f"trained after: {actual:.3f}")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss (nats/byte)",
           title="Predictable scaling at a fixed token budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long pass on a small corpus")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    b = budget(args.quick, args.steps)
    name = "reproduce_scaling" + ("_quick" if args.quick else "")
    png = plot_path(name)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {d: train_run("dense-tiny", size_overrides(d), b, Path(tmp) / f"d{d}", evals=2) for d in FIT_WIDTHS}
        ns = [non_embedding(runs[d], d) for d in FIT_WIDTHS]
        losses = [runs[d]["val_loss"] for d in FIT_WIDTHS]
        fit = fit_power_law(ns, losses)
        n5 = non_embedding({"parameters": zoo.create_model("dense-tiny", overrides=size_overrides(PREDICT_WIDTH))
                            .num_parameters()}, PREDICT_WIDTH)
        predicted = predict(fit, n5)
        payload = {"quick": args.quick, **b, "fit_widths": list(FIT_WIDTHS), "predict_width": PREDICT_WIDTH,
                   "sizes": [{"d_model": d, "non_embedding_parameters": n, "val_loss": loss}
                             for d, n, loss in zip(FIT_WIDTHS, ns, losses)],
                   "fit": fit, "prediction": {"d_model": PREDICT_WIDTH, "non_embedding_parameters": n5,
                                              "predicted_val_loss": predicted}}
        columns = ["d_model", "non-embedding parameters", "val loss", "fit / prediction", "fit - measured"]
        rows = [[d, n, loss, predict(fit, n), predict(fit, n) - loss] for d, n, loss in zip(FIT_WIDTHS, ns, losses)]
        title = (f"Scaling, 4 layers, {b['steps']} steps of {b['batch_size']} x {b['seq_len']} bytes of "
                 f"{b['corpus']}, seed 0")
        save(name, {**payload, "status": f"predicted, d_model {PREDICT_WIDTH} not trained yet",
                    "table": table(title, columns, rows + [[f"{PREDICT_WIDTH} (predicted first)", n5, None,
                                                            predicted, None]])})
        print(f"fit {fit}; predicted loss at N={n5:,}: {predicted:.4f} (saved before training it)", flush=True)
        actual = train_run("dense-tiny", size_overrides(PREDICT_WIDTH), b, Path(tmp) / f"d{PREDICT_WIDTH}",
                           evals=2)["val_loss"]
    rows.append([f"{PREDICT_WIDTH} (predicted first)", n5, actual, predicted, predicted - actual])
    print_table(columns, rows)
    plot(ns, losses, fit, n5, predicted, actual, png)
    payload["prediction"].update(actual_val_loss=actual, error=predicted - actual,
                                 relative_error=(predicted - actual) / actual)
    path = save(name, {**payload, "status": "complete", "table": table(title, columns, rows),
                       "reading": reading(fit, predicted, actual, n5, losses), "plots": [png.name]})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
