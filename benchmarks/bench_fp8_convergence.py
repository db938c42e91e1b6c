"""Does training with FP8 linears track bf16? Validation loss after the same steps, every recipe, three seeds.

DeepSeek-V3 (arXiv 2412.19437 §3.3, Fig. 10) reports its fine-grained FP8 recipe within 0.25% relative loss of
bf16 over long runs. Here a 2-layer byte-level ``dense-tiny`` (d_model 128) trains 200 AdamW steps of 8 x 128
bytes of ``python-stdlib`` in bf16 autocast with ``model.fp8.recipe`` none (bf16), tensorwise, rowwise and
blockwise (emulated on CPU: quantise -> dequantise -> matmul, :mod:`zoo.fp8`), same seed and batches per seed;
the table gives each recipe's validation loss (mean and min-max over seeds) and its relative gap to bf16.

``python -m benchmarks.bench_fp8_convergence [--quick] [--steps N] [--seeds N]``
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile

import numpy as np
import torch

import zoo
from benchmarks._common import print_table, save, table
from zoo.train.config import DataConfig
from zoo.train.data import prepare_tokens

RECIPES = ("none", "tensorwise", "rowwise", "blockwise")


def train_val_loss(tokens, recipe: str, steps: int, batch: int, seq: int, n_layers: int, seed: int = 0) -> float:
    """Validation loss of a tiny byte-level LM trained ``steps`` AdamW steps on ``tokens`` (a prepared corpus
    with ``train`` / ``val`` token arrays), bf16 autocast, ``model.fp8.recipe = recipe`` (emulated on CPU);
    ``seed`` draws the init and the batches."""
    # Tiny GEMMs gain nothing from threads; on a shared 2-core machine OpenMP spin-waits made this 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_steps(tokens, recipe, steps, batch, seq, n_layers, seed)
    finally:
        torch.set_num_threads(threads)


def _windows(stream, starts, seq: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([stream[i:i + seq] for i in starts]).astype(np.int64))


def _train_steps(tokens, recipe: str, steps: int, batch: int, seq: int, n_layers: int, seed: int) -> float:
    train, val = tokens.train, tokens.val
    torch.manual_seed(seed)
    model = zoo.create_model("dense-tiny", n_layers=n_layers, d_model=128, max_seq_len=seq,
                             mixer={"n_heads": 4, "n_kv_heads": 4}, ffn={"d_hidden": 256}, fp8={"recipe": recipe})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    # Warm-up, cosine decay and clipping as train.py does: without them the loss spikes, and the final
    # loss of two runs apart by rounding alone differs by several percent.
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * max(s - warmup, 0) / max(1, steps - warmup)))))
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = _windows(train, torch.randint(0, len(train) - seq, (batch,), generator=generator).tolist(), seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    x = _windows(val, torch.linspace(0, len(val) - seq, 64).long().tolist(), seq)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x, labels=x).loss.item()


def band(values: list[float]) -> dict:
    """A table cell: the mean over seeds with the min-max band."""
    return {"median": statistics.mean(values), "min": min(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long pass")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    steps, batch, seq, layers = (args.steps or 6, 2, 32, 1) if args.quick else (args.steps or 200, 8, 128, 2)
    seeds = range(args.seeds or (1 if args.quick else 3))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ZOO_CACHE"] = cache
        tokens = prepare_tokens(DataConfig(corpus="pydoc-topics" if args.quick else "python-stdlib", tokenizer="bytes"))
        losses = {r: [train_val_loss(tokens, r, steps, batch, seq, layers, seed) for seed in seeds] for r in RECIPES}
    bf16 = losses["none"]
    gaps = {r: [(a - b) / b for a, b in zip(v, bf16)] for r, v in losses.items()}
    columns = ["recipe", "val loss (nats/byte)", "relative gap to bf16 (same seed)"]
    rows = [[r, band(losses[r]), band(gaps[r])] for r in RECIPES]
    print_table(columns, [[r, f"{statistics.mean(losses[r]):.4f}", f"{statistics.mean(gaps[r]):+.4%}"] for r in RECIPES])
    worst = max(RECIPES[1:], key=lambda r: max(abs(g) for g in gaps[r]))
    reading = (f"After {steps} steps the largest relative gap of any FP8 recipe to bf16 is "
               f"{max(abs(g) for g in gaps[worst]):.3%} ({worst}); DeepSeek-V3 reports under 0.25% for its "
               f"blockwise recipe at scale. Seeds {list(seeds)}; the spread of bf16 itself over seeds is "
               f"{max(bf16) - min(bf16):.4f} nats/byte.")
    print(reading)
    name = "bench_fp8_convergence" + ("_quick" if args.quick else "")
    path = save(name, {"quick": args.quick, "steps": steps, "batch": batch, "seq_len": seq, "n_layers": layers,
                       "seeds": list(seeds), "val_loss": losses, "relative_gap": gaps, "reading": reading,
                       "table": table(f"FP8 vs bf16 training, {steps} steps of {batch} x {seq} bytes, {layers} layers, "
                                      f"seeds {list(seeds)} (mean, min-max)", columns, rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
