"""The expert-parallel section of ``bench_scale``: a MoE model's training step on 2 CPU processes (gloo, one thread
each) with the experts split over them (``train.parallel.expert_parallel: 2``) and with the experts replicated (plain
data parallelism), and the all-to-all's share of the expert-parallel step.

Both layouts are built as training builds them, without Lightning's loop around them: expert parallelism by
``zoo.train.parallel.parallelize`` on a ``(dp=1, ep=2)`` device mesh (expert weights sharded, the
:class:`~zoo.blocks.dispatch.AllToAllDispatcher`, the other weights' gradients averaged after backward), the
replicated layout by ``torch.nn.parallel.DistributedDataParallel`` (what Lightning's default strategy wraps the
model in: gradient all-reduce in buckets, overlapped with backward); zoo's AdamW, the precision ``train.precision:
auto`` picks on this CPU (bf16 autocast or float32), the loss-free
bias update summed over both ranks. Each rank trains on its own micro-batch, the same for both layouts, so the
layouts compute the same losses (reported as a check). The two processes are forked from the benchmark's process
(its imports are paid once; each sets one torch thread before computing) and keep both models, so the layouts'
repeats alternate in the same processes.

Step time: median over repeats of ``steps`` steps, every repeat started by a barrier. The all-to-all's time comes
from further ``steps`` steps of each layout under ``torch.profiler`` (CPU ops only): the wall time of the top-level
collective ops on the main thread whose names say all-to-all (the split-size exchange, the rows' exchange, their
backward, which gloo runs on its own thread while the main thread waits), over the same profiled steps' wall time.
Time waiting for the slower rank is part of an exchange, as it is in training. The gradient all-reduce's share
is counted the same way; under DDP only what the main thread visibly waits for shows.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

import zoo
from benchmarks._common import alternate, cpu_precision
from zoo.train.config import OptimizerConfig, ParallelConfig
from zoo.train.metrics import all_reduce_sum
from zoo.train.module import make_optimizer
from zoo.train.parallel import DP, EP, parallelize

PRESET = "deepseek-moe-tiny"
WORLD = 2
EXCHANGE, REDUCE = ("all_to_all", "alltoall", "wait_tensor"), ("all_reduce", "allreduce")


def shape(quick: bool) -> dict:
    """Per rank: the micro-batch (2 ranks x 4 x 256 tokens = the single-process ``bench_scale`` step's 8 x 256)."""
    return {"n_layers": 2, "batch": 2, "seq": 32, "steps": 1, "repeats": 2} if quick else \
        {"n_layers": 4, "batch": 4, "seq": 256, "steps": 3, "repeats": 5}


def _stepper(model, ids, steps: int, after_backward=lambda: None):
    """``run()``: ``steps`` training steps after a barrier, returns seconds per step; ``run.loss``: the last
    loss. One warm-up step first."""
    optimizer = make_optimizer(model.module if isinstance(model, DistributedDataParallel) else model,
                               OptimizerConfig())
    stepping = [m for m in model.modules() if callable(getattr(m, "on_optimizer_step", None))]
    bf16 = cpu_precision() == "bf16-mixed"

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        after_backward()
        optimizer.step()
        for module in stepping:
            module.on_optimizer_step(all_reduce_sum)
        return loss.item()

    def run() -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            run.loss = step()
        return (time.perf_counter() - start) / steps

    run.loss = step()
    return run


def _collective_seconds(prof) -> dict:
    """Seconds of top-level exchange / all-reduce ops on the main thread (the one that ran the most ops)."""
    roots = list(prof.profiler.kineto_results.experimental_event_tree())
    threads = [node.start_tid for node in roots]
    main = max(set(threads), key=threads.count)
    seconds, stack = {"exchange": 0.0, "all_reduce": 0.0}, [n for n in roots if n.start_tid == main]
    while stack:
        node = stack.pop()
        name = node.name.lower()
        kind = "exchange" if any(k in name for k in EXCHANGE) else "all_reduce" if any(k in name for k in REDUCE) \
            else None
        if kind:
            seconds[kind] += (node.end_time_ns - node.start_time_ns) / 1e9
        else:
            stack.extend(node.children)
    return seconds


def _worker(rank: int, quick: bool, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    s = shape(quick)
    models = {}
    for layout in ("replicated", "expert_parallel"):
        torch.manual_seed(0)  # the same initial weights in both layouts, on both ranks
        models[layout] = zoo.create_model(PRESET, n_layers=s["n_layers"], vocab_size=257,
                                          max_seq_len=s["seq"]).train()
    ids = torch.randint(0, 257, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1 + rank))
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=(DP, EP))
    plan = parallelize(models["expert_parallel"], mesh, ParallelConfig(expert_parallel=WORLD))
    runs = {"replicated": _stepper(DistributedDataParallel(models["replicated"]), ids, s["steps"]),
            "expert_parallel": _stepper(models["expert_parallel"], ids, s["steps"], plan.reduce_gradients)}
    seconds = alternate(runs, s["repeats"])
    result = {}
    for layout, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = run()
        comm = {k: v / s["steps"] for k, v in _collective_seconds(prof).items()}
        result[layout] = {"step_s": seconds[layout], "loss": run.loss, "profiled_step_s": profiled,
                          **{f"{k}_s": v for k, v in comm.items()},
                          **{f"{k}_fraction": v / profiled for k, v in comm.items()}}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_layouts(quick: bool) -> dict:
    """Both layouts on 2 forked processes; ``{rank: {layout: measurements}}`` (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(quick, os.path.join(tmp, "store"), tmp), nprocs=WORLD,
                           start_method="fork")
        return {rank: json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(WORLD)}
