"""FP8 linear and training-step time against bf16, per recipe (tensorwise, rowwise, blockwise).

On a CUDA GPU with float8 (compute capability >= 8.9): forward + backward of a ``d x d`` Float8Linear vs a
bf16 ``nn.Linear`` for d = 1024, 4096, 8192 on 8192 tokens, and the step time (fwd + bwd + AdamW) of the
GPU-scale preset ``dense-125m`` with and without ``model.fp8``. Tensorwise and rowwise GEMMs run on
``torch._scaled_mm``; blockwise is emulated per tile on every device (see ``zoo.fp8.linear``).

On CPU every FP8 GEMM is *emulated* (quantise -> dequantise -> float32 matmul), so the figures are the
emulation's overhead over bf16 autocast, not an FP8 speed-up; smaller shapes and the ``dense-tiny``
preset are used. Timings are medians of alternating repeats (a, b, a, b, ...) so that load from other
processes hits every variant alike. Run from the repository root: ``python -m benchmarks.bench_fp8 [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import zoo
from benchmarks._common import alternate, bar_plot, print_table, save, scaled, summary, table
from zoo.fp8 import Float8Linear, make_recipe

RECIPES = ("tensorwise", "rowwise", "blockwise")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def linear_runner(module: nn.Module, x: torch.Tensor, iters: int):
    """A callable timing ``iters`` forward + backward passes of ``module`` in bf16 autocast (seconds each)."""
    device = x.device.type

    def once():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = module(x)
        y.backward(torch.ones_like(y))

    once()
    _sync(device)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            once()
        _sync(device)
        return (time.perf_counter() - start) / iters

    return run


def step_runner(model: nn.Module, ids: torch.Tensor, iters: int):
    """A callable timing ``iters`` training steps (fwd + bwd + AdamW) in bf16 autocast (seconds each), as
    ``zoo.train`` runs them (its optimizer, the loss-only forward)."""
    from zoo.train.config import OptimizerConfig
    from zoo.train.module import make_optimizer

    device = ids.device.type
    optimizer = make_optimizer(model, OptimizerConfig())

    def once():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()

    once()
    _sync(device)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            once()
        _sync(device)
        return (time.perf_counter() - start) / iters

    return run


def bench_linears(device: str, dims, tokens: int, repeats: int, iters: int) -> tuple[dict, list]:
    results, rows = {}, []
    for d in dims:
        torch.manual_seed(0)
        base = nn.Linear(d, d, bias=False, device=device)
        x = torch.randn(tokens, d, device=device, requires_grad=True)
        variants = {"bf16": base, **{r: Float8Linear.from_linear(base, make_recipe(r)) for r in RECIPES}}
        times = alternate({name: linear_runner(m, x, iters) for name, m in variants.items()}, repeats)
        entry = {name: summary(t) for name, t in times.items()}
        flops = 6 * tokens * d * d
        for name in variants:
            entry[name]["tflops"] = flops / entry[name]["median"] / 1e12
            entry[name]["speedup_vs_bf16"] = entry["bf16"]["median"] / entry[name]["median"]
        results[str(d)] = entry
        rows.append([d, tokens, entry["bf16"]["median"] * 1e3,
                     *[entry[r]["median"] * 1e3 for r in RECIPES], *[entry[r]["speedup_vs_bf16"] for r in RECIPES]])
    return results, rows


def bench_preset(device: str, preset: str, batch: int, seq: int, repeats: int, iters: int,
                 overrides: dict) -> tuple[dict, list]:
    models = {}
    for recipe in ("none", *RECIPES):
        torch.manual_seed(0)
        models[recipe] = zoo.create_model(preset, max_seq_len=seq, fp8={"recipe": recipe}, **overrides).to(device)
    vocab = models["none"].config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    times = alternate({name: step_runner(m, ids, iters) for name, m in models.items()}, repeats)
    entry = {name: summary(t) for name, t in times.items()}
    for name in models:
        entry[name]["tokens_per_sec"] = batch * seq / entry[name]["median"]
        entry[name]["speedup_vs_bf16"] = entry["none"]["median"] / entry[name]["median"]
        entry[name]["fp8_linears"] = sum(isinstance(m, Float8Linear) for m in models[name].modules())
    rows = [[name, entry[name]["fp8_linears"], entry[name]["median"] * 1e3, entry[name]["tokens_per_sec"],
             entry[name]["speedup_vs_bf16"]] for name in models]
    return {"preset": preset, "batch": batch, "seq": seq, "overrides": overrides, "steps": entry}, rows


def result_tables(payload: dict) -> dict:
    """The payload's ``table`` and ``tables`` entries (see ``benchmarks/_common.py``), from its figures; the
    peer of every fp8 recipe is bf16 autocast on the same device."""
    step = payload["train_step"]
    rows = [[name if name != "none" else "bf16", e["fp8_linears"], scaled(e, 1e3), e["tokens_per_sec"],
             e["speedup_vs_bf16"]] for name, e in step["steps"].items()]
    linear_rows = [[int(d), *[scaled(e[v], 1e3) for v in ("bf16", *RECIPES)], *[e[r]["speedup_vs_bf16"] for r in RECIPES]]
                   for d, e in payload["linear_fwd_bwd"].items()]
    return {"table": table(f"{step['preset']} training step, batch {step['batch']} x {step['seq']}, {payload['mode']}",
                           ["fp8 recipe", "fp8 linears", "ms/step", "tokens/s", "x vs bf16"], rows),
            "tables": [table(f"d x d linear fwd + bwd on {payload['tokens']} tokens",
                             ["d", "bf16 ms", *[f"{r} ms" for r in RECIPES], *[f"{r} x vs bf16" for r in RECIPES]],
                             linear_rows)],
            "reading": reading(payload)}


def reading(payload: dict) -> str:
    """One paragraph composed from the figures: the GPU speed-up against the goal (>= 1.4x at d = 4096 on an
    H100), or on CPU what the emulation costs."""
    linears, step = payload["linear_fwd_bwd"], payload["train_step"]["steps"]
    step_x = ", ".join(f"{r} {step[r]['speedup_vs_bf16']:.2f}x" for r in RECIPES if r in step)
    if payload["emulation"]:
        worst = max(linears[d][r]["median"] / linears[d]["bf16"]["median"] for d in linears for r in RECIPES)
        return (f"EMULATION on CPU: quantise/dequantise + float32 GEMMs cost up to {worst:.1f}x a bf16 linear's time, "
                f"and the {payload['train_step']['preset']} step runs at {step_x} of bf16's speed. These figures say "
                f"nothing about fp8 on GPUs, where the GEMMs run on float8 tensor cores.")
    d = "4096" if "4096" in linears else max(linears, key=int)
    best = max(RECIPES, key=lambda r: linears[d][r]["speedup_vs_bf16"])
    x = linears[d][best]["speedup_vs_bf16"]
    return (f"{payload['mode']}: at d = {d} the fastest recipe, {best}, runs a linear's forward + backward at "
            f"{x:.2f}x bf16 (goal >= 1.4x: {'met' if x >= 1.4 else 'missed'}); the {payload['train_step']['preset']} "
            f"step runs at {step_x} of bf16's speed.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="plumbing only: the smallest shape, 2 repeats (CPU: d 64 on 128 tokens, 1 layer, 2 x 32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    device = "cuda" if cuda else "cpu"
    repeats = 2 if args.quick else args.repeats
    if cuda:
        dims, tokens, iters = (1024, 4096, 8192), 8192, 10
        preset, batch, seq, preset_overrides = "dense-125m", 8, 2048, {}
    else:
        dims, tokens, iters = (256, 512, 1024), 2048, 2
        preset, batch, seq, preset_overrides = "dense-tiny", 8, 256, {}
    if args.quick and cuda:
        dims = dims[:1]
    elif args.quick:  # minuscule shapes: every recipe's code path in seconds
        dims, tokens, batch, seq, preset_overrides = (64,), 128, 2, 32, {"n_layers": 1}
    mode = "float8 GEMMs (torch._scaled_mm; blockwise emulated)" if cuda else "EMULATION on CPU (no float8 hardware)"
    print(f"device: {device} — {mode}")
    linears, linear_rows = bench_linears(device, dims, tokens, repeats, iters)
    print_table(["d", "tokens", "bf16 ms", *[f"{r} ms" for r in RECIPES], *[f"{r} x" for r in RECIPES]], linear_rows)
    step, step_rows = bench_preset(device, preset, batch, seq, repeats, 1 if not cuda else 5, preset_overrides)
    print(f"\n{preset} training step, batch {batch} x {seq} tokens, bf16 autocast")
    print_table(["fp8 recipe", "fp8 linears", "ms/step", "tokens/s", "x vs bf16"], step_rows)
    payload = {"device": device, "emulation": not cuda, "mode": mode, "repeats": repeats, "quick": args.quick,
               "tokens": tokens, "linear_fwd_bwd": linears, "train_step": step}
    payload["plots"] = [bar_plot("fp8", f"FP8 vs bf16, {mode}", [
        (f"d x d linear fwd + bwd, d = {d}", "x vs bf16 (>1: faster)",
         {r: linears[d][r]["speedup_vs_bf16"] for r in RECIPES}) for d in linears] + [
        (f"{preset} training step", "x vs bf16 (>1: faster)",
         {r: e["speedup_vs_bf16"] for r, e in step["steps"].items() if r != "none"})])]
    path = save("fp8", {**payload, **result_tables(payload)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
