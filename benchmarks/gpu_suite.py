"""GPU section of the suite: MFU of the GPU-scale presets, xformers vs SDPA attention, fp8 vs bf16 step time.

Runs only on a CUDA device; without one it prints "no CUDA device: GPU section skipped" and saves a JSON that
says so. On CUDA, all in bf16 autocast, training steps (fwd + bwd + AdamW) on random tokens:

- MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022, App. B) of ``dense-125m`` and ``deepseek-moe-1b``
  over a few hundred steps: ``tokens/s x (6 N_active + 12 L d T) / peak``, against the device's nominal dense
  bf16 peak (PaLM's definition; ``NOMINAL_BF16_PEAK``) and against the measured rate of an 8192^3 bf16 GEMM
  (what the device really delivers);
- ``dense-125m`` with ``mixer.backend=xformers`` vs ``sdpa`` (when xformers is installed);
- ``dense-125m`` with ``fp8.recipe=tensorwise`` vs bf16 (``benchmarks/bench_fp8.py`` has the per-recipe detail).

Step times are medians of alternating repeats. Run: ``python -m benchmarks.gpu_suite [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

import zoo
from benchmarks._common import alternate, print_table, save, summary, table
from benchmarks.bench_fp8 import step_runner


NOMINAL_BF16_PEAK = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                     "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense, no sparsity


def nominal_peak_flops(device_name: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of a known device (the longest matching name), else None."""
    matches = [key for key in NOMINAL_BF16_PEAK if key.replace(" ", "").lower() in device_name.replace(" ", "").lower()]
    return NOMINAL_BF16_PEAK[max(matches, key=len)] if matches else None


def cuda_matmul_peak_flops(n: int = 8192, repeats: int = 10) -> float:
    """Median FLOP/s of an ``n x n @ n x n`` bf16 matmul on the current CUDA device."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / summary(times)["median"]


def flops_per_token(model, seq: int) -> float:
    """``6 N`` with N the matmul parameters a token touches (active parameters, the output head included, an
    untied input embedding -- a lookup -- excluded) plus attention ``12 L d T``."""
    m = model.config.model
    lookup = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    return 6 * (model.num_parameters(active=True) - lookup) + 12 * m.n_layers * m.d_model * seq


def compare(variants: dict, batch: int, seq: int, repeats: int, iters: int) -> dict:
    """Seconds per training step of each ``name -> model`` (alternating repeats of ``iters`` steps)."""
    vocab = next(iter(variants.values())).config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    times = alternate({name: step_runner(m, ids, iters) for name, m in variants.items()}, repeats)
    return {name: summary(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 steps per measurement instead of --steps")
    parser.add_argument("--steps", type=int, default=150, help="training steps per measurement (default 150)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU section skipped")
        save("gpu_suite", {"skipped": True, "quick": args.quick, "reason": "no CUDA device",
                           "table": table("GPU section", ["status"], [["skipped: no CUDA device"]]),
                           "reading": "Skipped: this machine has no CUDA device, so the GPU section (MFU of "
                                      "dense-125m and deepseek-moe-1b, xformers vs SDPA, fp8 vs bf16) did not run."})
        return
    steps = 20 if args.quick else args.steps
    repeats, batch, seq = 3, 8, 2048
    iters = steps // repeats
    measured = cuda_matmul_peak_flops()
    nominal = nominal_peak_flops(torch.cuda.get_device_name())
    peak = nominal or measured
    rows, results = [], {"peak_bf16_flops": peak, "peak_source": "nominal" if nominal else "measured",
                         "measured_bf16_gemm_flops": measured, "batch": batch, "seq": seq, "steps": steps,
                         "repeats": repeats}

    for preset in ("dense-125m", "deepseek-moe-1b"):
        torch.manual_seed(0)
        model = zoo.create_model(preset, max_seq_len=seq).cuda()
        t = compare({preset: model}, batch, seq, repeats, iters)[preset]
        achieved = batch * seq / t["median"] * flops_per_token(model, seq)
        mfu = achieved / peak
        results[preset] = {"step_s": t, "mfu": mfu, "fraction_of_measured_gemm": achieved / measured,
                           "active_parameters": model.num_parameters(active=True)}
        rows.append([f"{preset} MFU", t, batch * seq / t["median"], mfu])
        del model
        torch.cuda.empty_cache()

    torch.manual_seed(0)
    variants = {"sdpa": zoo.create_model("dense-125m", max_seq_len=seq, mixer={"backend": "sdpa"}).cuda()}
    if importlib.util.find_spec("xformers") is not None:
        torch.manual_seed(0)
        variants["xformers"] = zoo.create_model("dense-125m", max_seq_len=seq, mixer={"backend": "xformers"}).cuda()
    attn = compare(variants, batch, seq, repeats, iters)
    results["attention_backend"] = attn
    for name, t in attn.items():
        rows.append([f"dense-125m attention {name}", t, batch * seq / t["median"], attn["sdpa"]["median"] / t["median"]])
    del variants
    torch.cuda.empty_cache()

    variants = {}
    for recipe in ("none", "tensorwise"):
        torch.manual_seed(0)
        variants[recipe] = zoo.create_model("dense-125m", max_seq_len=seq, fp8={"recipe": recipe}).cuda()
    fp8 = compare(variants, batch, seq, repeats, iters)
    results["fp8"] = fp8
    for name, t in fp8.items():
        rows.append([f"dense-125m {'bf16' if name == 'none' else 'fp8 ' + name}", t, batch * seq / t["median"],
                     fp8["none"]["median"] / t["median"]])

    columns = ["run", "s/step", "tokens/s", "MFU or x vs sdpa/bf16 peer"]
    print(f"bf16 peak: {peak / 1e12:,.0f} TFLOP/s ({results['peak_source']}); 8192^3 GEMM measured: "
          f"{measured / 1e12:,.0f} TFLOP/s")
    print_table(columns, [[r[0], r[1]["median"], r[2], r[3]] for r in rows])
    mfus = ", ".join(f"{p} {results[p]['mfu']:.1%}" for p in ("dense-125m", "deepseek-moe-1b"))
    xf = (f"xformers runs at {attn['sdpa']['median'] / attn['xformers']['median']:.2f}x SDPA's speed"
          if "xformers" in attn else "xformers is not installed, so only SDPA was timed")
    reading = (f"On {torch.cuda.get_device_name()} ({results['peak_source']} bf16 peak {peak / 1e12:,.0f} TFLOP/s; an "
               f"8192^3 GEMM measured {measured / 1e12:,.0f}), MFU over {steps} steps: {mfus}. {xf}; fp8 tensorwise "
               f"runs the dense-125m step at "
               f"{fp8['none']['median'] / fp8['tensorwise']['median']:.2f}x bf16's speed.")
    save("gpu_suite", {"skipped": False, "quick": args.quick, "device": torch.cuda.get_device_name(),
                       "results": results, "table": table(f"GPU training steps, bf16 autocast, batch {batch} x {seq}",
                                                          columns, rows), "reading": reading})


if __name__ == "__main__":
    main()
