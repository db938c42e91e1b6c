"""Runs several training jobs one after another in the processes Lightning launches (for tests/test_parallel.py).

``python tests/parallel_worker.py SPEC.json``: SPEC is a list of ``{"overrides": {...}, "crash_at_save": n}``;
each job is ``zoo.train.run.train(load_config("dense-tiny", overrides))``. The first job's Trainer starts the
other ranks (re-running this script); later jobs reuse the processes and their process group. After each job
every rank writes its loss-free balancing biases to ``out_dir/biases-rank<r>.safetensors``.

``crash_at_save: n`` makes the job's ``n``-th distributed-checkpoint save crash on rank 1 right after it wrote its
shard (before the save's metadata exists): the torch.distributed.checkpoint collectives carry the failure to
every rank, the job ends with that error on all ranks (with what it left on disk: ``out_dir/crash-rank<r>.json``) and the next job runs
in the same processes, as a restarted job would. ``kill_at_save: n`` instead makes rank 1, once its shard of the
``n``-th save is written, SIGKILL rank 0 and then itself: no handler, ``finally`` block or collective runs any
more, as when a scheduler kills the job; the launch ends with rank 0's -9 and the disk holds what it held then.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

import zoo
from zoo.train.run import train


class SaveCrash(RuntimeError):
    pass


def crash_at_save(n: int):
    """Patch the checkpoint writer; returns the function that puts it back."""
    write_data, saves = FileSystemWriter.write_data, []

    def write_then_crash(self, plan, planner):
        written = write_data(self, plan, planner)
        written.wait()  # the shard is on disk
        saves.append(1)
        if dist.get_rank() == 1 and len(saves) == n:
            raise SaveCrash(f"rank 1 crashed in save {n}, its shard written")
        return written

    FileSystemWriter.write_data = write_then_crash
    return lambda: setattr(FileSystemWriter, "write_data", write_data)


def kill_at_save(n: int, out_dir: str) -> None:
    """Patch the checkpoint writer for ``kill_at_save`` (the processes die with it, so nothing is put back).
    Rank 0 leaves its pid beside the run in its first save, which ends before rank 1's ``n``-th (n >= 2) starts."""
    write_data, saves = FileSystemWriter.write_data, []
    pid_file = Path(out_dir, "pid-rank0")

    def write_then_kill(self, plan, planner):
        written = write_data(self, plan, planner)
        written.wait()  # the shard is on disk
        saves.append(1)
        if dist.get_rank() == 0 and len(saves) == 1:
            pid_file.write_text(str(os.getpid()))
        if dist.get_rank() == 1 and len(saves) == n:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    FileSystemWriter.write_data = write_then_kill


def main(spec_path: str) -> None:
    for job in json.loads(Path(spec_path).read_text()):
        config = zoo.load_config("dense-tiny", job["overrides"])
        if job.get("kill_at_save"):
            kill_at_save(job["kill_at_save"], config.train.out_dir)
        if job.get("crash_at_save"):
            restore = crash_at_save(job["crash_at_save"])
            try:
                train(config)
            except CheckpointException as err:  # the crash, on every rank: what it left on disk
                last = Path(config.train.out_dir, "checkpoints", "last.ckpt")
                left = {"error": f"{type(err).__name__}: {err}",
                        "last_step": torch.load(last / "meta.pt", weights_only=True)["global_step"],
                        "partial": sorted(p.name for d in last.parent.glob(".last.ckpt.tmp-*") for p in d.iterdir())}
                Path(config.train.out_dir, f"crash-rank{dist.get_rank()}.json").write_text(json.dumps(left))
            finally:
                restore()
            continue
        result = train(config)
        biases = {name: buffer.clone() for name, buffer in result.module.model.named_buffers()
                  if name.endswith("expert_bias")}
        if biases:
            save_file(biases, str(Path(result.out_dir) / f"biases-rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
