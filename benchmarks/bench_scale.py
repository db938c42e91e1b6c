"""Scaling knobs on one device: ``train.compile`` and ``train.activation_checkpointing`` vs the eager step, and the
memory planner's estimate beside the measured peak.

CPU (always): training steps (fwd + bwd + AdamW, bf16 autocast, zoo's optimizer and loss-only forward) of
``dense-tiny`` and ``deepseek-moe-tiny``, each variant in its own process (a fresh compiler cache state and a
clean peak-RSS counter): eager, compiled blocks, and eager with every block recomputed in backward. Reported:
tokens/s (median of repeats after the compile / warm-up step), the compiled step's speedup, the first step's
time (compilation), the final loss (equal within bf16 rounding), and the peak resident memory the steps added
(``ru_maxrss`` after minus before; gradients, AdamW state, activations) beside what ``zoo.train.plan`` says for
the same three parts (``gradients + optimizer + activations``). ``--quick`` checks the plumbing in seconds:
``dense-tiny`` alone, 2 layers, 2 x 32 tokens, blocks compiled with the ``aot_eager`` backend (TorchDynamo
capture + AOT autograd, no code generation: a cold Inductor compile of even one tiny block costs ~40
CPU-seconds; ``tests/test_block_wrappers.py`` has that check behind ``ZOO_TEST_INDUCTOR``).

GPU (when CUDA exists): MFU of ``dense-125m`` and ``deepseek-moe-1b`` with and without compile (PaLM's
``6 N_active + 12 L d T`` FLOPs per token over the device's nominal bf16 peak, as ``gpu_suite``), with
``torch.cuda.max_memory_allocated`` beside the planner's total. ``SECTIONS`` lists the row builders;
multi-process layouts add theirs there. Run: ``python -m benchmarks.bench_scale [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import zoo
from benchmarks._common import alternate, bar_plot, print_table, save, summary, table, zoo_training_stepper
from zoo.blocks.experts import CPU_ROW_ALIGN
from zoo.train.block_wrappers import wrap_blocks
from zoo.train.plan import plan_memory

VARIANTS = {"eager": ("none", False), "compile": ("none", True), "checkpointed": ("full", False)}
CPU_PRESETS = ("dense-tiny", "deepseek-moe-tiny")
QUICK_CPU_PRESETS = ("dense-tiny",)  # its compile is the cheapest (MoE blocks recompile per routing shape)


def compile_backend(quick: bool) -> str:
    """The ``torch.compile`` backend of the compiled variant: Inductor, or ``aot_eager`` for ``--quick``."""
    return "aot_eager" if quick else "inductor"


def cpu_shape(quick: bool) -> dict:
    return {"n_layers": 2, "batch": 2, "seq": 32, "steps": 1, "repeats": 2} if quick else \
        {"n_layers": 4, "batch": 8, "seq": 256, "steps": 3, "repeats": 5}


def run_variant(preset: str, variant: str, quick: bool) -> dict:
    """One variant in this process: tokens/s of repeated steps, first-step seconds, final loss, peak RSS added."""
    torch.manual_seed(0)
    s = cpu_shape(quick)
    model = zoo.create_model(preset, n_layers=s["n_layers"], vocab_size=257, max_seq_len=s["seq"])
    ac, compiled = VARIANTS[variant]
    wrap_blocks(model.train(), ac, compiled, backend=compile_backend(quick))
    ids = torch.randint(0, 257, (s["batch"], s["seq"]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    run = zoo_training_stepper(model, ids, s["steps"])  # includes the first (compiling) step
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    rates = alternate({"run": run}, s["repeats"])["run"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss.item()
    return {"tokens_per_sec": summary(rates), "first_step_s": first, "loss": loss, "peak_rss_added": peak}


def planned(preset: str, variant: str, quick: bool) -> int:
    """The planner's gradients + optimizer state + activations for the variant's layout (bytes)."""
    s = cpu_shape(quick)
    config = zoo.load_config(preset, {"model.n_layers": s["n_layers"], "model.vocab_size": 257,
                                      "model.max_seq_len": s["seq"]})
    plan = plan_memory(config.model, s["batch"], s["seq"], activation_checkpointing=VARIANTS[variant][0],
                       precision="bf16-mixed", expert_row_align=CPU_ROW_ALIGN)
    return plan.gradient_bytes + plan.optimizer_bytes + plan.activation_bytes


def cpu_rows(quick: bool) -> tuple[list, dict]:
    results = {}
    for preset in QUICK_CPU_PRESETS if quick else CPU_PRESETS:
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--variant", preset, variant] + (
                ["--quick"] if quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.setdefault(preset, {})[variant] = {**json.loads(out.strip().splitlines()[-1]),
                                                        "planned": planned(preset, variant, quick)}
    rows = []
    for preset, by_variant in results.items():
        eager = by_variant["eager"]["tokens_per_sec"]["median"]
        for variant, r in by_variant.items():
            rate = r["tokens_per_sec"]
            rows.append([preset, variant, rate, rate["median"] / eager, r["first_step_s"], r["loss"],
                         r["peak_rss_added"] / 2**20, r["planned"] / 2**20,
                         r["planned"] / r["peak_rss_added"] - 1 if r["peak_rss_added"] else None])
    return rows, results


def gpu_rows(quick: bool) -> tuple[list, dict]:
    """MFU of the GPU-scale presets with and without compile, measured peak beside the planner (CUDA only)."""
    if not torch.cuda.is_available():
        return [], {}
    from benchmarks.bench_fp8 import step_runner
    from benchmarks.gpu_suite import nominal_peak_flops

    peak = nominal_peak_flops(torch.cuda.get_device_name())
    rows, results = [], {}
    seq, batch, steps = (1024, 4, 5) if quick else (2048, 8, 20)
    for preset in ("dense-125m", "deepseek-moe-1b"):
        for compiled in (False, True):
            config = zoo.load_config(preset, {"model.max_seq_len": seq})
            with torch.device("cuda"):
                model = zoo.build_model(config.model).train()
            wrap_blocks(model, "none", compiled)
            ids = torch.randint(0, config.model.vocab_size, (batch, seq), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            run = step_runner(model, ids, steps)  # seconds per step, synchronised
            rates = [batch * seq / t for t in alternate({"run": run}, 3)["run"]]
            measured = torch.cuda.max_memory_allocated()
            plan = plan_memory(config.model, batch, seq, precision="bf16-mixed")
            m = config.model
            lookup = 0 if m.tie_embeddings else m.vocab_size * m.d_model
            flops = 6 * (model.num_parameters(active=True) - lookup) + 12 * m.n_layers * m.d_model * seq
            mfu = summary(rates)["median"] * flops / peak if peak else None
            variant = "compile" if compiled else "eager"
            results[f"{preset} {variant}"] = {"tokens_per_sec": summary(rates), "mfu": mfu, "peak_bytes": measured,
                                              "planned_bytes": plan.total_bytes}
            rows.append([preset, variant, summary(rates), mfu, measured / 2**30, plan.total_bytes / 2**30,
                         plan.total_bytes / measured - 1])
            del model, run
            torch.cuda.empty_cache()
    return rows, results


# Row builders of further layouts (e.g. expert parallelism across processes) append themselves here.
SECTIONS = {"cpu": cpu_rows, "gpu": gpu_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(*args.variant, args.quick)))
        return
    cpu, cpu_results = SECTIONS["cpu"](args.quick)
    columns = ["preset", "variant", "tokens/s", "vs eager", "first step s", "loss", "peak RSS added MiB",
               "planned MiB", "planner error"]
    print_table(columns, [[c["median"] if isinstance(c, dict) else c for c in row] for row in cpu])
    tables = []
    gpu, gpu_results = SECTIONS["gpu"](args.quick)
    if gpu:
        gpu_columns = ["preset", "variant", "tokens/s", "MFU", "peak GiB", "planned GiB", "planner error"]
        print_table(gpu_columns, [[c["median"] if isinstance(c, dict) else c for c in row] for row in gpu])
        tables.append(table("GPU: MFU with and without compile, planner vs measured peak", gpu_columns, gpu))
    speedups = {p: r["compile"]["tokens_per_sec"]["median"] / r["eager"]["tokens_per_sec"]["median"]
                for p, r in cpu_results.items()}
    costs = {p: 1 - r["checkpointed"]["tokens_per_sec"]["median"] / r["eager"]["tokens_per_sec"]["median"]
             for p, r in cpu_results.items()}
    reading = (f"Compiled blocks ({compile_backend(args.quick)}) ran the step "
               + ", ".join(f"{v:.2f}x ({p})" for p, v in speedups.items())
               + " the eager speed (goal 1.3x); recomputing every block cost "
               + ", ".join(f"{100 * v:.0f}% of the eager rate ({p})" for p, v in costs.items()) + ".")
    plot = bar_plot("bench_scale" + ("_quick" if args.quick else ""), "Training step on CPU (bf16 autocast)",
                    [(p, "tokens/s", {v: r[v]["tokens_per_sec"] for v in VARIANTS}) for p, r in cpu_results.items()])
    save("bench_scale" + ("_quick" if args.quick else ""), {
        "quick": args.quick, "shape": cpu_shape(args.quick), "compile_backend": compile_backend(args.quick),
        "cpu": cpu_results, "gpu": gpu_results or None,
        "reading": reading, "plots": [plot], "tables": tables,
        "table": table("CPU: eager vs compiled vs checkpointed blocks, planner vs measured peak", columns, cpu)})
    print(reading)


if __name__ == "__main__":
    main()
