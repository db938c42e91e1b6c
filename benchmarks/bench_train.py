"""End-to-end training throughput of a preset with the real data pipeline vs the model step alone.

Four measurements, interleaved over repeats (medians reported) so that machine load hits all alike:

* ``step``: forward + backward + clip + AdamW on one batch already in memory (bf16 autocast as the preset);
* ``data``: fetching batches from the real training ``DataLoader`` (memory-mapped token cache);
* ``data+step``: the two in one plain loop;
* ``lightning``: ``zoo.train.run.train`` itself (its ``train/tokens_per_sec``: Lightning, hooks and logging
  included, validation, checkpoints and start-up excluded).

Data loading's share of step time is ``data / step`` per batch; it must stay under 5%.
Run from the repository root: ``python -m benchmarks.bench_train [--preset dense-tiny] [--steps 8] [--repeats 3]
[--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

import zoo
from benchmarks._common import alternate, bar_plot, print_table, save, scaled, summary, table
from zoo.train.data import ZooDataModule
from zoo.train.module import param_groups
from zoo.train.run import train


def result_tables(payload: dict) -> dict:
    """The payload's ``table`` entry (see ``benchmarks/_common.py``), from its figures; the peer of each run
    is the model step alone on a batch already in memory."""
    per_step = payload["seconds_per_step"]
    base = per_step["step"]["median"]
    rows = [[name, scaled(t, 1e3), payload["tokens_per_sec"].get(name), 100 * t["median"] / base]
            for name, t in per_step.items()]
    return {"table": table(f"{payload['preset']} training, {payload['tokens_per_step']} tokens/step, "
                           f"{payload['precision']}", ["run", "ms/step", "tokens/s", "% of the model step"], rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dense-tiny")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 steps, small batches of pydoc-topics")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 2, 1
        args.overrides = ["train.batch_size=2", "train.data.seq_len=64", "train.data.corpus=pydoc-topics",
                          *args.overrides]

    config = zoo.load_config(args.preset, args.overrides)
    train_cfg = config.train
    datamodule = ZooDataModule(config)
    if config.model.vocab_size is None:
        config.model.vocab_size = datamodule.tokenizer.vocab_size
    model = zoo.build_model(config).train()
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.optimizer.weight_decay), lr=1e-4)
    bf16 = train_cfg.precision.startswith("bf16")
    loader = iter(datamodule.train_dataloader())
    fixed = next(loader)
    tokens_per_step = fixed.numel()

    def step(batch: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - start) / args.steps  # seconds per step

    def lightning_run() -> float:
        with tempfile.TemporaryDirectory() as out:
            run = zoo.load_config(config, {
                "train.out_dir": out, "train.max_steps": args.steps + 1, "train.log_every": args.steps + 1,
                "train.val_check_interval": 10**6, "train.checkpoint_every": 10**6, "train.val_batches": 1,
                "train.sample_tokens": 0, "train.schedule.warmup_steps": 1})
            train(run)
            with open(Path(out) / "metrics.csv", newline="") as f:
                rate = [float(r["train/tokens_per_sec"]) for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
        return tokens_per_step / rate[-1]  # seconds per step (its first step, warm-up included)

    step(fixed)  # warm-up
    runs = {
        "step": lambda: timed(lambda: step(fixed)),
        "data": lambda: timed(lambda: next(loader)),
        "data+step": lambda: timed(lambda: step(next(loader))),
        "lightning": lightning_run,
    }
    results = alternate(runs, args.repeats)
    med = {name: summary(values)["median"] for name, values in results.items()}
    rows = [[name, med[name] * 1e3, tokens_per_step / med[name] if name != "data" else float("nan"),
             100 * med[name] / med["step"]] for name in runs]
    print(f"{args.preset}: {tokens_per_step} tokens/step (batch {train_cfg.batch_size} x seq {train_cfg.data.seq_len}),"
          f" {train_cfg.precision}, {torch.get_num_threads()} threads, medians of {args.repeats} x {args.steps} steps")
    print_table(["run", "ms/step", "tokens/s", "% of step"], rows)
    share = med["data"] / med["step"]
    print(f"data loading: {100 * share:.2f}% of the model step ({'under' if share < 0.05 else 'OVER'} the 5% budget)")
    payload = {
        "preset": args.preset, "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
        "quick": args.quick, "tokens_per_step": tokens_per_step, "precision": train_cfg.precision,
        "seconds_per_step": {k: summary(v) for k, v in results.items()},
        "tokens_per_sec": {k: tokens_per_step / v for k, v in med.items() if k != "data"},
        "data_share_of_step": share}
    name = "bench_train" + ("_quick" if args.quick else "")
    payload["plots"] = [bar_plot(name, f"{args.preset} training, {tokens_per_step} tokens/step, {train_cfg.precision}",
                                 [("seconds per step", "ms (median, min-max)",
                                   {k: scaled(v, 1e3) for k, v in payload["seconds_per_step"].items()})])]
    path = save(name, {**payload, **result_tables(payload)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
