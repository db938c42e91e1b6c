"""Retention training cost: parallel vs chunkwise form, forward + backward, time and peak memory.

One ``retention`` mixer of the retnet-tiny shape (d_model 256, 4 heads, value width 512), batch 1,
bf16 autocast (the training precision), at T = 128 ... 8192. Times are medians of alternating
repeats (parallel, chunkwise, parallel, ...) in one process. Peak memory is measured in a fresh
process per (form, T): the rise of the resident set's high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) over the resident set before it, for one
forward + backward after a warm-up step; it counts everything the step allocates, autograd's saved
tensors included. A chunk-size sweep at T = 2048 picks the default ``chunk_size``; the crossover of
the two forms sets ``AUTO_PARALLEL_MAX_LEN`` in ``zoo/blocks/retention.py``.

Run from the repository root: ``python -m benchmarks.bench_retention [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, alternate, print_table, save, scaled, summary, table
from zoo.blocks.retention import MultiScaleRetention, RetentionConfig
from zoo.model import init_weights
from zoo.registry import BlockContext

D_MODEL, N_HEADS, BATCH = 256, 4, 1


def make_step(mode: str, T: int, chunk_size: int = 64):
    mixer = init_weights(MultiScaleRetention(RetentionConfig(n_heads=N_HEADS, mode=mode, chunk_size=chunk_size),
                                             BlockContext(D_MODEL, 4, 0, T, 0.02)))
    x = torch.randn(BATCH, T, D_MODEL, requires_grad=True)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mixer(x)
        y.float().pow(2).mean().backward()
        return time.perf_counter() - start

    return step


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure_peak_memory(mode: str, T: int) -> None:
    """In this (fresh) process: print the peak RSS rise of one forward + backward, in MiB, as JSON."""
    step = make_step(mode, T)
    step()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory_mib(mode: str, T: int) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_retention", "--memory", mode, str(T)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def result_tables(payload: dict, name: str) -> dict:
    """The payload's ``table`` entry (see ``benchmarks/_common.py``), from its figures; the peer of the
    chunkwise form is the parallel form (the plain-PyTorch reference)."""
    rows = [[r["T"], scaled(r["parallel"]["time_s"], 1e3), scaled(r["chunkwise"]["time_s"], 1e3),
             r["parallel"]["time_s"]["median"] / r["chunkwise"]["time_s"]["median"], r["parallel"]["peak_mib"],
             r["chunkwise"]["peak_mib"], r["chunkwise"]["peak_mib"] / r["parallel"]["peak_mib"]]
            for r in payload["results"]]
    return {"table": table("Retention mixer fwd + bwd (d 256, 4 heads, batch 1, bf16 autocast): chunkwise vs parallel",
                           ["T", "parallel ms", "chunkwise ms", "chunkwise speed-up", "parallel peak MiB",
                            "chunkwise peak MiB", "chunkwise / parallel memory"], rows),
            "plots": [f"{name}.png"], "quick": name.endswith("_quick")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 128 only (2 chunks), one repeat (seconds)")
    parser.add_argument("--memory", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 gives steadier figures on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        measure_peak_memory(args.memory[0], int(args.memory[1]))
        return
    lengths = [128] if args.quick else [128, 256, 512, 2048, 8192]
    results = []
    for T in lengths:
        steps = {mode: make_step(mode, T) for mode in ("parallel", "chunkwise")}
        for step in steps.values():
            step()  # warm-up
        repeats = 1 if args.quick else (5 if T <= 512 else 3 if T <= 2048 else 2)
        times = alternate(steps, repeats)
        row = {"T": T}
        for mode in steps:
            row[mode] = {"time_s": summary(times[mode]), "peak_mib": peak_memory_mib(mode, T)}
        results.append(row)
        print(f"T={T} done", flush=True)
    sweep = []
    if not args.quick:
        T = 2048
        steps = {f"chunk {c}": make_step("chunkwise", T, c) for c in (32, 64, 128, 256)}
        for step in steps.values():
            step()
        times = alternate(steps, 3)
        sweep = [{"chunk_size": int(name.split()[1]), "time_s": summary(t)} for name, t in times.items()]

    print(f"\nretention mixer fwd+bwd, d_model {D_MODEL}, {N_HEADS} heads, batch {BATCH}, bf16 autocast, "
          f"{torch.get_num_threads()} threads (machine shared with other jobs)")
    rows = []
    for r in results:
        p, c = r["parallel"], r["chunkwise"]
        rows.append([r["T"], p["time_s"]["median"] * 1e3, c["time_s"]["median"] * 1e3,
                     p["time_s"]["median"] / c["time_s"]["median"], p["peak_mib"], c["peak_mib"],
                     c["peak_mib"] / p["peak_mib"]])
    print_table(["T", "parallel ms", "chunkwise ms", "speed-up", "parallel MiB", "chunkwise MiB", "mem ratio"], rows)
    if sweep:
        print("\nchunk-size sweep, chunkwise fwd+bwd at T=2048")
        print_table(["chunk_size", "ms"], [[s["chunk_size"], s["time_s"]["median"] * 1e3] for s in sweep])
    name = "bench_retention_quick" if args.quick else "bench_retention"
    payload = {"shape": {"d_model": D_MODEL, "n_heads": N_HEADS, "batch": BATCH, "dtype": "bf16-autocast"},
               "memory_method": "rise of VmHWM (reset via /proc/self/clear_refs) over VmRSS, fresh process",
               "results": results, "chunk_sweep_T2048": sweep}
    path = save(name, {**payload, **result_tables(payload, name)})
    plot(results, RESULTS / f"{name}.png")
    print(f"\nwrote {path}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    Ts = [r["T"] for r in results]
    for mode in ("parallel", "chunkwise"):
        ax_t.plot(Ts, [r[mode]["time_s"]["median"] * 1e3 for r in results], "o-", label=mode)
        ax_m.plot(Ts, [r[mode]["peak_mib"] for r in results], "o-", label=mode)
    for ax, ylabel in ((ax_t, "forward + backward, ms"), (ax_m, "peak memory rise, MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("retention mixer (d_model 256, 4 heads, batch 1, bf16 autocast, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
