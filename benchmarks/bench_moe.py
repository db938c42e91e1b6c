"""Training throughput of zoo's top-k MoE vs transformers' MixtralForCausalLM, same shapes, same run.

Hidden 256, 4 layers, 8 heads (4 K/V heads), 8 experts top-2 of intermediate 896, vocab 32000, untied
embeddings, batch 8 x 256: forward + backward + AdamW step under bf16 autocast on CPU, each library as its
trainer runs it (zoo: ``zoo.train``'s optimizer and loss-only forward; transformers: its ``Trainer``'s
default fused AdamW). transformers runs with its default experts implementation (``grouped_mm``) and its
``eager`` per-expert loop. Each
repeat times ``--steps`` steps per model, models alternating, so machine load hits all alike; tokens/s
are medians over repeats. A second table times the MoE block alone (forward + backward of one layer's
experts and router on the same 8 x 256 tokens), where the dispatch is all that differs. The fraction
of the measured bf16 matmul peak counts FLOPs of active parameters only: ``6 N_active`` per token
(N_active: one token's matmul weights, top-2 experts and the LM head included, embeddings excluded) plus
attention ``12 L d T`` (PaLM, Chowdhery et al. 2022, App. B).

Run from the repository root: ``python -m benchmarks.bench_moe [--quick] [--profile] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import zoo
from benchmarks._common import (RESULTS, alternate, matmul_peak_flops, peer_training_stepper, print_table, save,
                                summary, table, zoo_training_stepper)

SHAPE = dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, n_experts=8, top_k=2, d_hidden=896,
             vocab=32000, batch=8, seq=256)
QUICK_SHAPE = dict(SHAPE, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_hidden=64, vocab=256, batch=2,
                   seq=32)  # checks the plumbing only


def zoo_model(s):
    return zoo.create_model("dense-tiny", d_model=s["d_model"], n_layers=s["n_layers"], vocab_size=s["vocab"],
                            max_seq_len=s["seq"], tie_embeddings=False,
                            mixer={"n_heads": s["n_heads"], "n_kv_heads": s["n_kv_heads"]},
                            ffn={"type": "moe", "n_experts": s["n_experts"], "top_k": s["top_k"],
                                 "d_hidden": s["d_hidden"]})


def hf_model(s, experts_implementation: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["d_model"], intermediate_size=s["d_hidden"],
                           num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                           num_key_value_heads=s["n_kv_heads"], num_local_experts=s["n_experts"],
                           num_experts_per_tok=s["top_k"], max_position_embeddings=s["seq"], rms_norm_eps=1e-6,
                           tie_word_embeddings=False, router_aux_loss_coef=0.0, output_router_logits=False)
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_implementation
    return MixtralForCausalLM(config)


def active_matmul_params(model: torch.nn.Module, s) -> int:
    """One token's matmul weights: Linear layers (router, attention, head, dense FFNs) + top-k experts."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    router = sum(m.weight.numel() for m in model.modules() if type(m).__name__.endswith(("Router", "TopKRouter")))
    expert = 3 * s["d_model"] * s["d_hidden"]
    return linear + router + s["n_layers"] * s["top_k"] * expert


def layer_stepper(block, s, steps: int, zoo_block: bool):
    from zoo.blocks.auxiliary import AuxCollector

    x = torch.randn(s["batch"], s["seq"], s["d_model"], requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x, AuxCollector()) if zoo_block else block(x)
        y.float().square().mean().backward()

    step()

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * s["batch"] * s["seq"] / (time.perf_counter() - start)

    return run


def profile(runs: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run.step()
        print(f"\n{name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("tokens_per_sec", "whole training step"), ("moe_block_tokens_per_sec", "MoE block alone (fwd + bwd)")]
    for ax, (key, title) in zip(axes, panels):
        names = list(results[key])
        medians = [results[key][n]["median"] for n in names]
        errors = [[m - results[key][n]["min"] for n, m in zip(names, medians)],
                  [results[key][n]["max"] - m for n, m in zip(names, medians)]]
        ax.bar([n.replace("transformers ", "transformers\n") for n in names], medians, yerr=errors, capsize=4,
               color=["tab:green", "tab:blue", "tab:gray"])
        for i, m in enumerate(medians):
            ax.text(i + 0.05, m, f"{m:,.0f}", ha="left", va="bottom")
        ax.set_ylabel("tokens/s (median, min-max)")
        ax.set_title(title)
    s = results["shape"]
    fig.suptitle(f"MoE training, bf16 autocast, CPU ({results['threads']} thread(s)); d {s['d_model']}, "
                 f"{s['n_layers']} layers, {s['n_experts']} experts top-{s['top_k']}, vocab {s['vocab']:,}, "
                 f"batch {s['batch']}x{s['seq']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def result_tables(results: dict) -> dict:
    """The payload's ``table`` and ``tables`` entries (see ``benchmarks/_common.py``), from its figures."""
    tps, block = results["tokens_per_sec"], results["moe_block_tokens_per_sec"]
    peer, block_peer = tps["transformers grouped_mm"]["median"], block["transformers grouped_mm"]["median"]
    return {
        "table": table("Training step (fwd + bwd + AdamW, bf16 autocast), peer: transformers MixtralForCausalLM",
                       ["model", "tokens/s", "vs transformers grouped_mm", "fraction of bf16 peak"],
                       [[n, t, t["median"] / peer, results["fraction_of_peak"][n]] for n, t in tps.items()]),
        "tables": [table("MoE block alone (router + experts, fwd + bwd), peer: transformers' Mixtral block",
                         ["block", "tokens/s", "vs transformers grouped_mm"],
                         [[n, t, t["median"] / block_peer] for n, t in block.items()])],
        "plots": ["moe.png"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a minuscule shape, 2 repeats of 1 step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    peak_size = 256 if args.quick else 2048  # the side of the square matmul timed for the bf16 peak
    s = QUICK_SHAPE if args.quick else SHAPE
    torch.manual_seed(0)
    models = {"zoo": zoo_model(s), "transformers grouped_mm": hf_model(s, "grouped_mm"),
              "transformers eager": hf_model(s, "eager")}
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]))
    runs = {name: (zoo_training_stepper if name == "zoo" else peer_training_stepper)(model, ids, steps)
            for name, model in models.items()}
    if args.profile:
        profile(runs)
    peak = matmul_peak_flops(n=peak_size)
    timings = alternate(runs, repeats)
    peak = (peak + matmul_peak_flops(n=peak_size)) / 2  # before and after, as load drifts
    flops = {name: 6 * active_matmul_params(m, s) + 12 * s["n_layers"] * s["d_model"] * s["seq"]
             for name, m in models.items()}
    layer_runs = {name: layer_stepper(m.blocks[0].ffn if name == "zoo" else m.model.layers[0].mlp, s, 4 * steps,
                                      name == "zoo") for name, m in models.items()}
    layer_tps = {name: summary(t) for name, t in alternate(layer_runs, repeats).items()}
    tps = {name: summary(t) for name, t in timings.items()}
    base = tps["transformers grouped_mm"]["median"]
    rows = [[name, t["median"], t["median"] / base, t["median"] * flops[name] / peak] for name, t in tps.items()]
    print(f"bf16 matmul peak: {peak / 1e9:,.0f} GFLOP/s; FLOPs/token (active): {flops['zoo'] / 1e6:,.1f} M")
    print_table(["model", "tokens/s", "vs transformers grouped_mm", "frac. of bf16 peak"], rows)
    layer_base = layer_tps["transformers grouped_mm"]["median"]
    print("\nMoE block alone (router + experts, forward + backward):")
    print_table(["block", "tokens/s", "vs transformers grouped_mm"],
                [[name, t["median"], t["median"] / layer_base] for name, t in layer_tps.items()])
    params = {"total": models["zoo"].num_parameters(), "active": models["zoo"].num_parameters(active=True)}
    results = {"shape": s, "bf16_matmul_peak_flops": peak, "flops_per_token": flops, "repeats": repeats,
               "steps_per_repeat": steps, "quick": args.quick,
               "threads": torch.get_num_threads(), "zoo_parameters": params, "tokens_per_sec": tps,
               "speedup_vs_transformers_grouped_mm": tps["zoo"]["median"] / base,
               "speedup_vs_transformers_eager": tps["zoo"]["median"] / tps["transformers eager"]["median"],
               "fraction_of_peak": {row[0]: row[3] for row in rows}, "moe_block_tokens_per_sec": layer_tps,
               "moe_block_speedup_vs_transformers_grouped_mm": layer_tps["zoo"]["median"] / layer_base,
               "moe_block_speedup_vs_transformers_eager":
                   layer_tps["zoo"]["median"] / layer_tps["transformers eager"]["median"]}
    path = save("moe", {**results, **result_tables(results)})
    plot(results, RESULTS / "moe.png")
    print(f"wrote {path} and {RESULTS / 'moe.png'}")


if __name__ == "__main__":
    main()
