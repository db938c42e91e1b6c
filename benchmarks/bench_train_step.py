"""Training-step throughput of zoo's dense decoder vs transformers' LlamaForCausalLM, same shapes.

Forward + backward + AdamW step in bf16 autocast on CPU, each library as its trainer runs it (zoo:
``zoo.train``'s optimizer and loss-only forward; transformers: its ``Trainer``'s default fused AdamW);
tokens/s as medians of alternating repeats,
and each model's fraction of the machine's measured bf16 matmul peak, counting
``6 N tokens`` (N: parameters in matmuls, the LM head included) plus attention ``12 L d T`` per token
(PaLM, Chowdhery et al. 2022, App. B). Run from the repository root: ``python -m benchmarks.bench_train_step [--quick]``.
"""

from __future__ import annotations

import argparse

import torch

import zoo
from benchmarks._common import (alternate, matmul_peak_flops, peer_training_stepper, plot_path, print_table, save,
                                summary, table, zoo_training_stepper)

SHAPES = {
    "dense-tiny": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_hidden=704, batch=16, seq=256),
    "d512-l8": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_hidden=1408, batch=8, seq=256),
}
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


def result_tables(payload: dict) -> dict:
    """The payload's ``table`` entry (see ``benchmarks/_common.py``), from its figures."""
    rows = [[shape, e["tokens_per_sec"]["zoo"], e["tokens_per_sec"]["transformers"], e["speedup_vs_transformers"],
             e["mfu"]["zoo"], e["mfu"]["transformers"]] for shape, e in payload["results"].items()]
    return {"table": table("Training step (fwd + bwd + AdamW, bf16 autocast), peer: transformers LlamaForCausalLM",
                           ["shape", "zoo tokens/s", "transformers tokens/s", "zoo / transformers",
                            "zoo fraction of bf16 peak", "transformers fraction of bf16 peak"], rows)}


def plot(payload: dict) -> str:
    """Tokens/s (medians, min-max bars) and fraction of the bf16 peak per shape, zoo beside transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, impls = list(payload["results"]), ["zoo", "transformers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for offset, impl in zip((-0.2, 0.2), impls):
        xs = [i + offset for i in range(len(shapes))]
        tps = [payload["results"][s]["tokens_per_sec"][impl] for s in shapes]
        errors = [[t["median"] - t["min"] for t in tps], [t["max"] - t["median"] for t in tps]]
        axes[0].bar(xs, [t["median"] for t in tps], width=0.4, yerr=errors, capsize=3, label=impl)
        axes[1].bar(xs, [payload["results"][s]["mfu"][impl] for s in shapes], width=0.4, label=impl)
    for ax, label in zip(axes, ("tokens/s (median, min-max)", "fraction of measured bf16 matmul peak")):
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel(label)
        ax.legend()
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    fig.suptitle("Training step, bf16 autocast on CPU: zoo vs transformers LlamaForCausalLM")
    fig.tight_layout()
    path = plot_path("train_step")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats of 1 step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    shapes = {"dense-tiny": SHAPES["dense-tiny"]} if args.quick else SHAPES
    repeats, steps = (3, 1) if args.quick else (args.repeats, args.steps)
    peak = matmul_peak_flops()
    results, rows = {}, []
    for name, s in shapes.items():
        torch.manual_seed(0)
        models = {"zoo": zoo_model(s), "transformers": hf_model(s)}
        ids = torch.randint(0, VOCAB, (s["batch"], s["seq"]))
        timings = alternate({"zoo": zoo_training_stepper(models["zoo"], ids, steps),
                             "transformers": peer_training_stepper(models["transformers"], ids, steps)}, repeats)
        entry = {"shape": s, "tokens_per_sec": {}, "mfu": {}}
        for impl, model in models.items():
            flops_per_token = 6 * matmul_params(model) + 12 * s["n_layers"] * s["d_model"] * s["seq"]
            tps = summary(timings[impl])
            entry["tokens_per_sec"][impl] = tps
            entry["mfu"][impl] = tps["median"] * flops_per_token / peak
            entry["params"] = model.num_parameters() if impl == "zoo" else entry.get("params")
        entry["speedup_vs_transformers"] = (entry["tokens_per_sec"]["zoo"]["median"]
                                            / entry["tokens_per_sec"]["transformers"]["median"])
        results[name] = entry
        rows.append([name, entry["tokens_per_sec"]["zoo"]["median"], entry["tokens_per_sec"]["transformers"]["median"],
                     entry["speedup_vs_transformers"], entry["mfu"]["zoo"], entry["mfu"]["transformers"]])
    print(f"bf16 matmul peak: {peak / 1e9:,.0f} GFLOP/s")
    print_table(["shape", "zoo tok/s", "hf tok/s", "zoo/hf", "zoo frac. of peak", "hf frac. of peak"], rows)
    payload = {"bf16_matmul_peak_flops": peak, "repeats": repeats, "steps_per_repeat": steps, "quick": args.quick,
               "results": results}
    path = save("train_step", {**payload, **result_tables(payload), "plots": [plot(payload)]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
