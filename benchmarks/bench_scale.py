"""Scaling knobs on one device: ``train.compile`` and ``train.activation_checkpointing`` vs the eager step, and the
memory planner's estimate beside the measured peak.

CPU (always): training steps (fwd + bwd + AdamW, zoo's optimizer and loss-only forward, in the precision
``train.precision: auto`` picks on this CPU: bf16 autocast where it computes bf16 natively, else float32) of
``dense-tiny`` and ``deepseek-moe-tiny``, each variant in its own process (a fresh compiler cache state):
eager, compiled blocks, and eager with every block recomputed in backward. Reported: tokens/s (median of
repeats after the compile / warm-up step), the compiled step's speedup, the first step's time (compilation; every
import is done before it), the final loss (equal within bf16 rounding where bf16 is used), and the planner
(``zoo.train.plan.plan_memory``) beside the memory of one step measured after the timed ones: gradients, AdamW
state, activations and their peak together, from the CPU allocator's own records of the step
(``benchmarks/_memory.py`` says how, and why not the resident size). The planner's error is ``planned /
measured - 1`` per part and for the total against the measured peak (positive: it plans more than the step
used). ``--quick`` checks the plumbing in seconds: ``dense-tiny`` alone, 2 layers, 2 x 32 tokens, blocks
compiled with the ``aot_eager`` backend (TorchDynamo capture + AOT autograd, no code generation: a cold Inductor
compile of even one tiny block costs ~40 CPU-seconds; ``tests/test_block_wrappers.py`` has that check behind
``ZOO_TEST_INDUCTOR``).

Expert parallelism (always; ``benchmarks/_expert_parallel.py``): ``deepseek-moe-tiny`` on 2 CPU processes (gloo, one
thread each, 4 x 256 tokens per rank; ``--quick``: 2 layers, 2 x 32, about 2 seconds) with its experts split over
them (``train.parallel.expert_parallel: 2``, the all-to-all dispatcher) vs replicated (DDP): step time (median of
repeats, alternated in the same processes), the losses (equal), and the all-to-all's and the gradient
all-reduce's share of the step, from the profiled ops of the main thread.

GPU (when CUDA exists): MFU of ``dense-125m`` and ``deepseek-moe-1b`` with and without compile (PaLM's
``6 N_active + 12 L d T`` FLOPs per token over the device's nominal bf16 peak, as ``gpu_suite``), with
``torch.cuda.max_memory_allocated`` beside the planner's total. ``SECTIONS`` lists the row builders;
multi-process layouts add theirs there. Run: ``python -m benchmarks.bench_scale [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import zoo
from benchmarks._expert_parallel import run_layouts, shape as ep_shape
from benchmarks._common import (alternate, bar_plot, cpu_precision, print_table, save, scaled, summary, table,
                               training_stepper)
from benchmarks._memory import step_memory
from zoo.blocks.experts import CPU_ROW_ALIGN
from zoo.train.block_wrappers import wrap_blocks
from zoo.train.config import OptimizerConfig
from zoo.train.module import make_optimizer
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
    """One variant in this process: tokens/s of repeated steps, first-step seconds, final loss, and the memory of
    one more step (:func:`benchmarks._memory.step_memory`)."""
    torch.manual_seed(0)
    s = cpu_shape(quick)
    model = zoo.create_model(preset, n_layers=s["n_layers"], vocab_size=257, max_seq_len=s["seq"])
    ac, compiled = VARIANTS[variant]
    wrap_blocks(model.train(), ac, compiled, backend=compile_backend(quick))
    ids = torch.randint(0, 257, (s["batch"], s["seq"]))
    optimizer = make_optimizer(model, OptimizerConfig())  # zoo.train's AdamW (fused), as zoo_training_stepper
    start = time.perf_counter()
    bf16 = cpu_precision() == "bf16-mixed"
    run = training_stepper(model, ids, optimizer, s["steps"], bf16, return_logits=False)  # runs the first step
    first = time.perf_counter() - start
    rates = alternate({"run": run}, s["repeats"])["run"]
    memory = step_memory(run.step, model, optimizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss.item()
    return {"tokens_per_sec": summary(rates), "first_step_s": first, "loss": loss, "measured": memory}


PARTS = ("gradient_bytes", "optimizer_bytes", "activation_bytes")


def planned(preset: str, variant: str, quick: bool) -> dict:
    """The planner's gradients, optimizer state and activations for the variant's layout, and their sum as
    ``peak_bytes`` (bytes)."""
    s = cpu_shape(quick)
    config = zoo.load_config(preset, {"model.n_layers": s["n_layers"], "model.vocab_size": 257,
                                      "model.max_seq_len": s["seq"]})
    plan = plan_memory(config.model, s["batch"], s["seq"], activation_checkpointing=VARIANTS[variant][0],
                       precision=cpu_precision(), expert_row_align=CPU_ROW_ALIGN)
    parts = {part: getattr(plan, part) for part in PARTS}
    return {**parts, "peak_bytes": sum(parts.values())}


def cpu_rows(quick: bool) -> tuple[list, dict]:
    results = {}
    for preset in QUICK_CPU_PRESETS if quick else CPU_PRESETS:
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--variant", preset, variant] + (
                ["--quick"] if quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["planned"] = planned(preset, variant, quick)
            r["planner_error"] = {k: v / r["measured"][k] - 1 for k, v in r["planned"].items()}
            results.setdefault(preset, {})[variant] = r
    rows = []
    for preset, by_variant in results.items():
        eager = by_variant["eager"]["tokens_per_sec"]["median"]
        for variant, r in by_variant.items():
            rate = r["tokens_per_sec"]
            rows.append([preset, variant, rate, rate["median"] / eager, r["first_step_s"], r["loss"],
                         r["planned"]["peak_bytes"] / 2**20, r["measured"]["peak_bytes"] / 2**20,
                         r["planner_error"]["peak_bytes"]])
    return rows, results


def memory_rows(results: dict) -> list:
    """Per preset and variant: each part planned and measured (MiB) with the planner's error, the activations
    saved when backward starts, and what the step left alive that is not a gradient."""
    rows = []
    for preset, by_variant in results.items():
        for variant, r in by_variant.items():
            plan, measured, error = r["planned"], r["measured"], r["planner_error"]
            row = [preset, variant]
            for part in (*PARTS, "peak_bytes"):
                row += [plan[part] / 2**20, measured[part] / 2**20, error[part]]
            rows.append(row + [measured["saved_bytes"] / 2**20, measured["unaccounted_bytes"] / 2**20])
    return rows


MEMORY_COLUMNS = [f"{part} {kind}" for part in ("gradients", "AdamW", "activations", "total vs peak")
                  for kind in ("planned MiB", "measured MiB", "error")] + ["saved at backward MiB",
                                                                           "left alive MiB"]


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


def expert_parallel_rows(quick: bool) -> tuple[list, dict]:
    """Per layout and rank: step ms (repeats), its ratio to the replicated step, all-to-all and all-reduce ms and
    share of the step, the last loss."""
    results = run_layouts(quick)
    rows = []
    for layout in ("replicated", "expert_parallel"):
        for rank, by_layout in results.items():
            r, base = by_layout[layout], statistics.median(by_layout["replicated"]["step_s"])
            rows.append([layout, rank, scaled(summary(r["step_s"]), 1e3), statistics.median(r["step_s"]) / base,
                         1e3 * r["exchange_s"], r["exchange_fraction"], 1e3 * r["all_reduce_s"],
                         r["all_reduce_fraction"], r["loss"]])
    return rows, results


EP_COLUMNS = ["layout", "rank", "step ms", "vs replicated", "all-to-all ms", "all-to-all share", "all-reduce ms",
              "all-reduce share", "loss"]

# Row builders of the sections, by name: one device (cpu, gpu) and expert parallelism across processes.
SECTIONS = {"cpu": cpu_rows, "gpu": gpu_rows, "expert_parallel": expert_parallel_rows}


def planner_reading(results: dict) -> str:
    """The planner's errors, composed from the measured rows."""
    rows = [(f"{p} {v}", r) for p, by_variant in results.items() for v, r in by_variant.items()]

    def span(part: str, pick=lambda r: True) -> str:
        errors = [r["planner_error"][part] for _, r in rows if pick(r)]
        return f"{min(errors):+.1%} to {max(errors):+.1%}" if min(errors) != max(errors) else f"{errors[0]:+.1%}"

    saved = [r["planned"]["activation_bytes"] / r["measured"]["saved_bytes"] - 1
             for name, r in rows if not name.endswith("checkpointed")]
    return (f"The planner's gradients + AdamW state + activations were {span('peak_bytes')} off the measured peak of a "
            "step (" + ", ".join(f"{name} {r['planner_error']['peak_bytes']:+.1%}" for name, r in rows) + "); its "
            f"gradients {span('gradient_bytes')} and AdamW state {span('optimizer_bytes')} off what the step held; its "
            f"activations {span('activation_bytes')} off the most non-gradient bytes live in the step (backward's "
            f"transient buffers included, which it does not model) and {min(saved):+.1%} to {max(saved):+.1%} off "
            "the bytes saved for backward when backward starts (variants without recomputation).")


def expert_parallel_reading(results: dict) -> str:
    ratio = [statistics.median(r["expert_parallel"]["step_s"]) / statistics.median(r["replicated"]["step_s"])
             for r in results.values()]
    share = [r["expert_parallel"]["exchange_fraction"] for r in results.values()]
    reduce = [r["replicated"]["all_reduce_fraction"] for r in results.values()]
    return (f"On 2 CPU processes the expert-parallel step took {'/'.join(f'{v:.2f}' for v in ratio)}x the "
            f"replicated-expert step's time (ranks 0/1); its all-to-all was "
            f"{'/'.join(f'{v:.0%}' for v in share)} of the step, the replicated layout's visible gradient "
            f"all-reduce {'/'.join(f'{v:.0%}' for v in reduce)}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(*args.variant, args.quick)))
        return
    # first: its processes are forked from this one, before it has computed anything
    ep, ep_results = SECTIONS["expert_parallel"](args.quick)
    print_table(EP_COLUMNS, ep)
    cpu, cpu_results = SECTIONS["cpu"](args.quick)
    columns = ["preset", "variant", "tokens/s", "vs eager", "first step s", "loss", "planned MiB",
               "measured peak MiB", "planner error"]
    print_table(columns, [[c["median"] if isinstance(c, dict) else c for c in row] for row in cpu])
    memory = memory_rows(cpu_results)
    print_table(["preset", "variant", *MEMORY_COLUMNS], memory)
    tables = [table("Expert parallelism on 2 CPU processes (gloo) vs replicated experts (DDP)", EP_COLUMNS, ep),
              table("CPU: the planner's parts beside one step's measured memory (error = planned / measured - 1)",
                    ["preset", "variant", *MEMORY_COLUMNS], memory)]
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
               + ", ".join(f"{100 * v:.0f}% of the eager rate ({p})" for p, v in costs.items()) + ". "
               + planner_reading(cpu_results) + " " + expert_parallel_reading(ep_results))
    plot = bar_plot("bench_scale" + ("_quick" if args.quick else ""), f"Training step on CPU ({cpu_precision()})",
                    [(p, "tokens/s", {v: r[v]["tokens_per_sec"] for v in VARIANTS}) for p, r in cpu_results.items()])
    save("bench_scale" + ("_quick" if args.quick else ""), {
        "quick": args.quick, "shape": cpu_shape(args.quick), "compile_backend": compile_backend(args.quick),
        "cpu_precision": cpu_precision(),
        "cpu": cpu_results, "gpu": gpu_results or None, "expert_parallel": ep_results,
        "expert_parallel_shape": ep_shape(args.quick),
        "reading": reading, "plots": [plot], "tables": tables,
        "table": table("CPU: eager vs compiled vs checkpointed blocks, planner vs measured peak", columns, cpu)})
    print(reading)


if __name__ == "__main__":
    main()
