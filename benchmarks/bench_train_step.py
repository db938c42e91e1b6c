"""Training-step throughput of zoo's dense decoder vs transformers' LlamaForCausalLM, same shapes.

Forward + backward + AdamW step on CPU in both precisions ``train.precision: auto`` chooses between,
bf16-mixed (bf16 autocast) and 32-true, with the one auto picks on this machine; each library as its trainer
runs it (zoo: ``zoo.train``'s optimizer and loss-only forward; transformers: its ``Trainer``'s default fused
AdamW); tokens/s as medians of alternating repeats, and each model's fraction of the machine's measured matmul
peak in that precision, counting
``6 N tokens`` (N: parameters in matmuls, the LM head included) plus attention ``12 L d T`` per token
(PaLM, Chowdhery et al. 2022, App. B). Run from the repository root: ``python -m benchmarks.bench_train_step [--quick]``.
"""

from __future__ import annotations

import argparse

import torch

import zoo
from zoo.train.precision import resolve_precision
from benchmarks._common import (alternate, matmul_peak_flops, peer_training_stepper, plot_path, print_table, save,
                                summary, table, zoo_training_stepper)

SHAPES = {
    "dense-tiny": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_hidden=704, batch=16, seq=256),
    "d512-l8": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_hidden=1408, batch=8, seq=256),
}
QUICK_SHAPES = {"d64-l1": dict(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_hidden=128, batch=2, seq=32)}
VOCAB = 257


def zoo_model(s):
    return zoo.create_model("dense-tiny", d_model=s["d_model"], n_layers=s["n_layers"], vocab_size=VOCAB,
                            max_seq_len=s["seq"], mixer={"n_heads": s["n_heads"], "n_kv_heads": s["n_kv_heads"]},
                            ffn={"type": "mlp", "d_hidden": s["d_hidden"]})


def hf_model(s):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=s["d_model"], intermediate_size=s["d_hidden"],
                         num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                         num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["seq"],
                         rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def matmul_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


PRECISIONS = {"bf16-mixed": torch.bfloat16, "32-true": torch.float32}


def result_tables(payload: dict) -> dict:
    """The payload's ``table`` entry (see ``benchmarks/_common.py``), from its figures."""
    rows = [[shape, precision + (" (auto)" if precision == payload["auto_precision"]["picked"] else ""),
             e["tokens_per_sec"]["zoo"], e["tokens_per_sec"]["transformers"], e["speedup_vs_transformers"],
             e["mfu"]["zoo"], e["mfu"]["transformers"]]
            for shape, by_precision in payload["results"].items() for precision, e in by_precision.items()]
    return {"table": table("Training step (fwd + bwd + AdamW) per precision, peer: transformers LlamaForCausalLM",
                           ["shape", "precision", "zoo tokens/s", "transformers tokens/s", "zoo / transformers",
                            "zoo fraction of peak", "transformers fraction of peak"], rows)}


def plot(payload: dict) -> str:
    """Tokens/s (medians, min-max bars) and fraction of that precision's matmul peak per shape and precision,
    zoo beside transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(shape, precision) for shape, by_precision in payload["results"].items() for precision in by_precision]
    impls = ["zoo", "transformers"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.5 * len(cases), 4))
    for offset, impl in zip((-0.2, 0.2), impls):
        xs = [i + offset for i in range(len(cases))]
        entries = [payload["results"][shape][precision] for shape, precision in cases]
        tps = [e["tokens_per_sec"][impl] for e in entries]
        errors = [[t["median"] - t["min"] for t in tps], [t["max"] - t["median"] for t in tps]]
        axes[0].bar(xs, [t["median"] for t in tps], width=0.4, yerr=errors, capsize=3, label=impl)
        axes[1].bar(xs, [e["mfu"][impl] for e in entries], width=0.4, label=impl)
    for ax, label in zip(axes, ("tokens/s (median, min-max)", "fraction of measured matmul peak")):
        ax.set_xticks(range(len(cases)), [f"{shape}\n{precision}" for shape, precision in cases])
        ax.set_ylabel(label)
        ax.legend()
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(f"Training step on CPU (auto picks {payload['auto_precision']['picked']}): zoo vs transformers")
    fig.tight_layout()
    path = plot_path("train_step")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one minuscule shape, 2 repeats of 1 step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    picked, why = resolve_precision("auto", "cpu")
    peak_size = 256 if args.quick else 2048  # the side of the square matmul timed for each precision's peak
    peaks = {precision: matmul_peak_flops(dtype, n=peak_size) for precision, dtype in PRECISIONS.items()}
    results, rows = {}, []
    for name, s in shapes.items():
        results[name] = {}
        for precision in PRECISIONS:
            bf16 = precision == "bf16-mixed"
            torch.manual_seed(0)
            models = {"zoo": zoo_model(s), "transformers": hf_model(s)}
            ids = torch.randint(0, VOCAB, (s["batch"], s["seq"]))
            timings = alternate({"zoo": zoo_training_stepper(models["zoo"], ids, steps, bf16),
                                 "transformers": peer_training_stepper(models["transformers"], ids, steps, bf16)},
                                repeats)
            entry = {"shape": s, "tokens_per_sec": {}, "mfu": {}, "params": models["zoo"].num_parameters()}
            for impl, model in models.items():
                flops_per_token = 6 * matmul_params(model) + 12 * s["n_layers"] * s["d_model"] * s["seq"]
                entry["tokens_per_sec"][impl] = summary(timings[impl])
                entry["mfu"][impl] = entry["tokens_per_sec"][impl]["median"] * flops_per_token / peaks[precision]
            entry["speedup_vs_transformers"] = (entry["tokens_per_sec"]["zoo"]["median"]
                                                / entry["tokens_per_sec"]["transformers"]["median"])
            results[name][precision] = entry
            rows.append([name, precision, entry["tokens_per_sec"]["zoo"]["median"],
                         entry["tokens_per_sec"]["transformers"]["median"], entry["speedup_vs_transformers"],
                         entry["mfu"]["zoo"], entry["mfu"]["transformers"]])
    print(f"train.precision auto picks {picked} here: {why}")
    print(", ".join(f"{precision} matmul peak: {peak / 1e9:,.0f} GFLOP/s" for precision, peak in peaks.items()))
    print_table(["shape", "precision", "zoo tok/s", "hf tok/s", "zoo/hf", "zoo frac. of peak", "hf frac. of peak"],
                rows)
    payload = {"matmul_peak_flops": peaks, "auto_precision": {"picked": picked, "why": why}, "repeats": repeats,
               "steps_per_repeat": steps, "quick": args.quick, "results": results}
    path = save("train_step", {**payload, **result_tables(payload), "plots": [plot(payload)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
