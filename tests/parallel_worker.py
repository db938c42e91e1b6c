"""Runs several training jobs one after another in the processes Lightning launches (for tests/test_parallel.py).

``python tests/parallel_worker.py SPEC.json``: SPEC is a list of ``{"overrides": {...}, "crash_at_save": n}``;
each job is ``zoo.train.run.train(load_config("dense-tiny", overrides))``. The first job's Trainer starts the
other ranks (re-running this script); later jobs reuse the processes and their process group. After each job
every rank writes its loss-free balancing biases to ``out_dir/biases-rank<r>.safetensors``. ``crash_at_save``
kills rank 1 the ``n``-th time it has written its shard of a distributed checkpoint, before the save completes.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter

import zoo
from zoo.train.run import train


def crash_at_save(n: int) -> None:
    write_data, saves = FileSystemWriter.write_data, []

    def write_then_maybe_die(self, plan, planner):
        written = write_data(self, plan, planner)
        saves.append(1)
        if dist.get_rank() == 1 and len(saves) == n:
            os._exit(17)
        return written

    FileSystemWriter.write_data = write_then_maybe_die


def main(spec_path: str) -> None:
    for job in json.loads(Path(spec_path).read_text()):
        if job.get("crash_at_save"):
            crash_at_save(job["crash_at_save"])
        result = train(zoo.load_config("dense-tiny", job["overrides"]))
        biases = {name: buffer.clone() for name, buffer in result.module.model.named_buffers()
                  if name.endswith("expert_bias")}
        if biases:
            save_file(biases, str(Path(result.out_dir) / f"biases-rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
