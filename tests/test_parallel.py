"""train.parallel on CPU with gloo: expert parallelism and FSDP2 on 2 processes equal 1 process with the double
batch; sharded checkpoints survive a crash and a SIGKILL mid-save and resume exactly; the layout's config errors.

The 2-process jobs run in launches of tests/parallel_worker.py (Lightning starts the second rank; the jobs of a
launch share the processes): processes are the cost here, so one launch serves several checks, and only the
SIGKILLed run has a launch of its own.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.errors import ConfigError
from zoo.train.module import ZooLightningModule
from zoo.train.run import _check_resume, train

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model.vocab_size": None, "model.d_model": 32, "model.n_layers": 2, "model.max_seq_len": 64,
    "model.mixer": {"n_heads": 4, "n_kv_heads": 2}, "model.ffn": {"type": "mlp", "d_hidden": 64},
    "train.data": {"corpus": "pydoc-topics", "tokenizer": "bytes", "seq_len": 32}, "train.val_batches": 1,
    "train.log_every": 1, "train.sample_tokens": 0, "train.precision": "32-true", "train.schedule": {"warmup_steps": 2},
    "train.max_steps": 4, "train.val_check_interval": 4, "train.checkpoint_every": 2, "train.trainer.accelerator": "cpu",
    # Every step clipped (these models' gradient norms are ~0.5), and an AdamW eps above the gradients' size, so
    # that the update follows the gradients' scale (AdamW is nearly blind to it otherwise) and a wrong global norm
    # shows in the weights.
    "train.trainer.gradient_clip_val": 0.1, "train.optimizer.eps": 1.0e-2,
}
# Dropless top-2 routing with the loss-free bias; a rate large enough that 4 steps move it visibly.
MOE = {"model.ffn": {"type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 16, "loss_free_bias": True,
                     "bias_update_rate": 0.01}}
ONE = {"train.batch_size": 8}
TWO = {"train.batch_size": 4, "train.trainer.devices": 2}
EP = {"train.parallel.expert_parallel": 2}
FSDP = {"train.parallel.fsdp": True}
# name: (the single-process reference it must equal, its overrides)
JOBS = {"ep": ("moe", {**MOE, **TWO, **EP}), "fsdp-dense": ("dense", {**TWO, **FSDP}),
        "fsdp-moe": ("moe", {**MOE, **TWO, **FSDP}), "fsdp-ep-moe": ("moe", {**MOE, **TWO, **FSDP, **EP})}


def _losses(out_dir: Path, name: str = "train/loss") -> dict[int, float]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def _launch(jobs: list[dict], spec: Path) -> subprocess.CompletedProcess:
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_worker.py"), str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references; a 2-process launch SIGKILLed in its second sharded save (once rank 1's shard of
    step 4 is written), with what it left on disk; then one 2-process launch: the JOBS, a run whose second sharded
    save crashes (on rank 1, once its shard of step 4 is written), the resume of that run and of the killed one."""
    tmp = tmp_path_factory.mktemp("parallel")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_CACHE", str(tmp / "cache"))
    single = {name: train(zoo.load_config("dense-tiny", {**BASE, **overrides, "train.out_dir": str(tmp / name)}))
              for name, overrides in (("moe", {**MOE, **ONE}), ("dense", ONE))}
    jobs = [{"overrides": {**BASE, **overrides, "train.out_dir": str(tmp / name)}} for name, (_, overrides)
            in JOBS.items()]
    crashed = {**BASE, **JOBS["ep"][1], "train.out_dir": str(tmp / "crash")}
    jobs += [{"overrides": crashed, "crash_at_save": 2}, {"overrides": {**crashed, "train.resume": True}}]
    killed = {**crashed, "train.out_dir": str(tmp / "killed")}
    kill = _launch([{"overrides": killed, "kill_at_save": 2}], tmp / "kill.json")
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-3000:]
    checkpoints = tmp / "killed" / "checkpoints"
    left = {"last_step": torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)["global_step"],
            "partial": sorted(p.name for d in checkpoints.glob(".last.ckpt.tmp-*") for p in d.iterdir())}
    jobs.append({"overrides": {**killed, "train.resume": True}})
    launch = _launch(jobs, tmp / "jobs.json")
    mp.undo()
    assert launch.returncode == 0, launch.stderr[-3000:]
    return tmp, single, left


def _assert_same_training(tmp: Path, name: str, reference) -> None:
    two, one = _losses(tmp / name), _losses(reference.out_dir)
    assert sorted(two) == [1, 2, 3, 4]
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), (name, step)
    assert _losses(tmp / name, "val/loss")[4] == pytest.approx(reference.val_loss, abs=1e-5)
    # final/ is one consolidated checkpoint that loads in this single process
    merged = zoo.from_pretrained(tmp / name / "final").state_dict()
    for key, value in reference.module.model.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_equal_one_process_double_batch(runs, name):
    tmp, single, _ = runs
    reference = single[JOBS[name][0]]
    _assert_same_training(tmp, name, reference)
    last = tmp / name / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"} <= {p.name for p in last.iterdir()}
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    assert not list(last.parent.glob(".last.ckpt.tmp-*"))
    if JOBS[name][0] == "moe":  # the loss-free biases moved identically on every rank and as on one process
        ranks = [load_file(tmp / name / f"biases-rank{r}.safetensors") for r in (0, 1)]
        expected = {k: b for k, b in reference.module.model.named_buffers() if k.endswith("expert_bias")}
        assert set(ranks[0]) == set(expected) and any(b.abs().sum() > 0 for b in expected.values())  # they moved
        for key, bias in expected.items():
            assert torch.equal(ranks[0][key], bias) and torch.equal(ranks[1][key], bias), key


def test_crash_during_a_sharded_save_keeps_the_previous_checkpoint_and_resumes_exactly(runs):
    tmp, _, _ = runs
    for rank in (0, 1):  # the save of step 4 failed on every rank, leaving step 2's checkpoint and a partial one
        left = json.loads((tmp / "crash" / f"crash-rank{rank}.json").read_text())
        assert "rank 1 crashed in save 2, its shard written" in left["error"] and left["last_step"] == 2
        assert "__1_0.distcp" in left["partial"] and ".metadata" not in left["partial"]
    assert sorted(_losses(tmp / "crash")) == [1, 2, 3, 4]
    _assert_resumed_as_uninterrupted(tmp, "crash")


def test_a_run_killed_during_a_sharded_save_keeps_the_previous_checkpoint_and_resumes_exactly(runs):
    tmp, _, left = runs
    # SIGKILL once rank 1's shard of step 4 was written: step 2's checkpoint whole, the dead save's partial one apart
    assert left["last_step"] == 2
    assert "__1_0.distcp" in left["partial"] and ".metadata" not in left["partial"]
    _assert_resumed_as_uninterrupted(tmp, "killed")


def _assert_resumed_as_uninterrupted(tmp: Path, name: str) -> None:
    """The run ``name``, resumed from step 2's checkpoint, trained steps 3-4 and ended as the uninterrupted EP run,
    with a whole step-4 checkpoint and the dead save's shards removed."""
    resumed, uninterrupted = _losses(tmp / name), _losses(tmp / "ep")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    a, b = (load_file(tmp / d / "final" / "model.safetensors") for d in ("ep", name))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    last = tmp / name / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    assert not list(last.parent.glob(".last.ckpt.tmp-*"))


@pytest.mark.parametrize("overrides, message", [
    ({"train.parallel.expert_parallel": 3, "train.trainer.devices": 4},
     "train.parallel.expert_parallel=3 does not divide the world size 4 (train.trainer.devices=4 x "
     "train.trainer.num_nodes=1)"),
    ({"train.parallel.expert_parallel": 2, "train.trainer.devices": 1}, "does not divide the world size 1"),
    ({"train.parallel.expert_parallel": 4, "train.trainer.devices": 2, "train.trainer.num_nodes": 2, **MOE,
      "model.layers.1.ffn": {"n_experts": 6}}, "expert_parallel=4 does not divide the n_experts=6"),
    ({"train.parallel.fsdp": True, "train.trainer.strategy": "ddp"}, "train.trainer.strategy must be auto, got 'ddp'"),
    ({"train.parallel.expert_parallel": 0}, "train.parallel: expert_parallel must be positive, got 0"),
    ({"train.parallel.expert_parallel": 2, "train.trainer.devices": 2, **MOE, "model.fp8.recipe": "rowwise"},
     "the FP8 experts do not run expert-parallel yet"),
])
def test_parallel_layout_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        zoo.load_config("dense-tiny", {**BASE, **overrides})
    assert message in str(err.value)


def test_resume_reads_a_sharded_checkpoint_and_refuses_another_layout(runs, tmp_path):
    tmp, _, _ = runs
    last = tmp / "ep" / "checkpoints" / "last.ckpt"
    sharded = zoo.load_config("dense-tiny", {**BASE, **JOBS["ep"][1], "model.vocab_size": 257})
    assert _check_resume(last, sharded, ZooLightningModule(sharded)) == 4  # step and shapes from meta.pt and DCP
    wider = zoo.load_config(sharded, {"model.ffn.d_hidden": 24})
    with pytest.raises(ConfigError, match=r"other shapes .*model.ffn.d_hidden: 16 in the checkpoint, 24 now"):
        _check_resume(last, wider, ZooLightningModule(wider))
    plain = zoo.load_config(sharded, {"train.parallel.expert_parallel": 1})
    with pytest.raises(ConfigError, match="is a sharded checkpoint, written with train.parallel"):
        _check_resume(last, plain, ZooLightningModule(plain))
