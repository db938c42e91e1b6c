"""Training: a tiny end-to-end run, exact resume, non-finite losses, DDP on CPU, the train.py CLI."""

import csv
import errno
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import zoo
from zoo.errors import ConfigError
from zoo.tokenizer import HFTokenizer
from zoo.blocks.router import max_violation
from zoo.train.metrics import moe_max_violation, perplexity
from zoo.train.module import lr_factor, param_groups
from zoo.train.callbacks import ResumableCSVLogger
from zoo.train.precision import cpu_bf16_flags, resolve_precision
from zoo.train.run import resolve_run, train
from zoo.train.rundir import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model.vocab_size": None, "model.d_model": 32, "model.n_layers": 1, "model.max_seq_len": 64,
    "model.mixer": {"n_heads": 4, "n_kv_heads": 2}, "model.ffn": {"type": "mlp", "d_hidden": 64},
    "train.data": {"corpus": "pydoc-topics", "tokenizer": "bytes", "seq_len": 32},
    "train.batch_size": 8, "train.val_batches": 2, "train.log_every": 1, "train.sample_tokens": 8,
    "train.precision": "32-true", "train.schedule": {"warmup_steps": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_CACHE", str(tmp_path_factory.mktemp("zoo-cache")))
    yield
    mp.undo()


def tiny_config(out_dir, **overrides):
    return zoo.load_config("dense-tiny", {**TINY, "train.out_dir": str(out_dir), **overrides})


def read_metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows, name) -> dict[int, float]:
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def test_tiny_run_logs_learns_and_exports(tmp_path):
    config = tiny_config(tmp_path, **{"train.max_steps": 30, "train.val_check_interval": 10,
                                      "train.checkpoint_every": 10, "model.d_model": 64})
    before = config.to_dict()
    result = train(config)
    assert result.config.model.vocab_size == 257  # followed the bytes tokenizer
    assert config.to_dict() == before  # the caller's config is unchanged
    rows = read_metrics(tmp_path)
    for name in ("train/loss", "train/lm_loss", "train/aux_loss", "train/mtp_loss", "train/lr",
                 "train/tokens_per_sec", "val/loss", "val/ppl"):
        assert name in rows[0], name
    val = column(rows, "val/loss")
    assert sorted(val) == [10, 20, 30] and val[30] < val[10] < math.log(257)
    assert column(rows, "val/ppl")[30] == pytest.approx(math.exp(val[30]))
    assert result.val_loss == pytest.approx(val[30]) and result.steps == 30 and result.sample
    assert sorted(column(rows, "train/loss")) == list(range(1, 31))
    assert (tmp_path / "loss.png").stat().st_size > 0 and not (tmp_path / "expert_load.png").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30

    loaded = zoo.from_pretrained(tmp_path / "final")
    ids = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, result.module.model(ids).logits, rtol=0, atol=0)
    tokenizer = HFTokenizer.from_file(tmp_path / "final" / "tokenizer.json")
    assert tokenizer.encode("x = 1") == list(b"x = 1")


class _SignalAt(Callback):
    """Sends this process SIGINT (what Ctrl-C does) during optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1 and batch_idx % trainer.accumulate_grad_batches == 0:
            os.kill(os.getpid(), signal.SIGINT)


# The Switch router draws jitter noise from the global RNG at every training forward: a resumed run matches
# only if the RNG states come back with the checkpoint (with them left as seeded, step 6 differs).
JITTERED_SWITCH = {"model.ffn": {"type": "switch", "n_experts": 4, "d_hidden": 32, "jitter_noise": 0.5,
                                 "capacity_factor": 1.0}}


@pytest.mark.parametrize("model", [{}, JITTERED_SWITCH], ids=["dense", "switch-jitter"])
def test_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path, model):
    common = {"train.max_steps": 8, "train.val_check_interval": 3, "train.checkpoint_every": 100,
              "train.trainer.accumulate_grad_batches": 2, "train.batch_size": 4, **model}
    train(tiny_config(tmp_path / "full", **common))

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, Python's handler in a shell
    stopped = train(tiny_config(tmp_path / "split", **common), callbacks=[_SignalAt(5)])
    assert stopped.interrupted and stopped.steps == 5
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not (tmp_path / "split" / "final").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    resumed = train(tiny_config(tmp_path / "split", **common, **{"train.resume": True}))
    assert resumed.steps == 8 and not resumed.interrupted
    losses_full = column(read_metrics(tmp_path / "full"), "train/loss")
    losses_split = column(read_metrics(tmp_path / "split"), "train/loss")
    assert sorted(losses_split) == list(range(1, 9))
    for step in range(1, 9):
        assert losses_split[step] == pytest.approx(losses_full[step], abs=1e-6), step
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("full", "split"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_default_out_dir_then_resume_the_latest_run_or_a_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = {**TINY, "train.val_check_interval": 2, "train.checkpoint_every": 2, "train.sample_tokens": 0}
    first = train(zoo.load_config("dense-tiny", {**common, "train.max_steps": 2}))
    assert first.out_dir.parent == Path("runs") / "dense-tiny"  # runs/<preset>/<timestamp>
    assert re.fullmatch(r"\d{8}-\d{6}-\d{6}", first.out_dir.name)

    latest = train(zoo.load_config("dense-tiny", {**common, "train.max_steps": 4, "train.resume": True}))
    assert latest.out_dir == first.out_dir and latest.steps == 4
    checkpoint = first.out_dir / "checkpoints" / "last.ckpt"
    by_path = train(zoo.load_config("dense-tiny", {**common, "train.max_steps": 6, "train.resume": str(checkpoint)}))
    assert by_path.out_dir == first.out_dir and by_path.steps == 6
    assert sorted(column(read_metrics(first.out_dir), "train/loss")) == list(range(1, 7))  # one continuous log


def test_default_run_dirs_are_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = zoo.load_config("dense-tiny", TINY)
    dirs = {resolve_run(config)[0].train.out_dir for _ in range(20)}
    assert len(dirs) == 20 and all(Path(d).is_dir() for d in dirs)


def _fake_run(out_dir: Path) -> None:
    (out_dir / "checkpoints").mkdir(parents=True)
    (out_dir / "checkpoints" / "last.ckpt").write_bytes(b"old checkpoint")
    (out_dir / "metrics.csv").write_text("step,train/loss\n1,5.0\n")


def test_new_run_refuses_a_directory_holding_another_run_unless_told(tmp_path, monkeypatch):
    _fake_run(tmp_path)
    config = tiny_config(tmp_path, **{"train.max_steps": 1, "train.val_check_interval": 1, "train.sample_tokens": 0})
    with pytest.raises(ConfigError, match=r"(?s)holds another run.*train\.resume=true.*train\.overwrite=true") as err:
        train(config)
    assert str(tmp_path) in str(err.value) and "checkpoints/last.ckpt, metrics.csv" in str(err.value)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"old checkpoint"
    with pytest.raises(ConfigError, match="contradict"):
        tiny_config(tmp_path, **{"train.overwrite": True, "train.resume": True})

    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's DDP re-launched into the run's directory
    monkeypatch.setenv("ZOO_RUN_DIR", str(tmp_path))
    assert resolve_run(config)[0].train.out_dir == str(tmp_path)
    monkeypatch.delenv("LOCAL_RANK")

    result = train(tiny_config(tmp_path, **{"train.max_steps": 1, "train.val_check_interval": 1,
                                            "train.sample_tokens": 0, "train.overwrite": True}))
    assert result.steps == 1 and sorted(column(read_metrics(tmp_path), "train/loss")) == [1]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        config = tiny_config(tmp_path, **{"train.max_steps": 1})
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {sleeper.pid}"):
            train(config)
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:  # the holder is gone: a stale lock
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not lock.path.exists()


def test_resume_names_changed_keys_and_refuses_another_model_shape(tmp_path, capsys):
    common = {"train.val_check_interval": 2, "train.checkpoint_every": 2, "train.sample_tokens": 0}
    train(tiny_config(tmp_path, **common, **{"train.max_steps": 2}))
    capsys.readouterr()
    resume = {**common, "train.resume": True, "train.max_steps": 3}
    with pytest.raises(ConfigError, match=r"other shapes .*model.d_model: 32 in the checkpoint, 48 now.*tensors: "):
        train(tiny_config(tmp_path, **resume, **{"model.d_model": 48}))
    result = train(tiny_config(tmp_path, **resume, **{"train.optimizer.lr": 1e-3}))
    assert result.steps == 3
    out = capsys.readouterr().out
    assert "config keys changed since it was saved: train.max_steps: 2 -> 3; train.optimizer.lr: 0.003 -> 0.001" in out


def test_resume_from_a_truncated_last_ckpt_names_the_file(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2, "train.val_check_interval": 2, "train.sample_tokens": 0}))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"checkpoints/last\.ckpt' is corrupt or truncated.*train\.overwrite=true"):
        train(tiny_config(tmp_path, **{"train.max_steps": 3, "train.resume": True}))


def test_bpe_run_sizes_the_model_and_its_tokenizer_json_trains_the_next_run(tmp_path):
    bpe = {"train.data.tokenizer": "bpe", "train.data.bpe_vocab_size": 300, "train.max_steps": 2,
           "train.val_check_interval": 2, "train.checkpoint_every": 2, "train.sample_tokens": 0}
    first_config = tiny_config(tmp_path / "bpe", **bpe)
    first = train(first_config)
    assert first.config.model.vocab_size == 300 and first.module.model.embed.num_embeddings == 300
    assert first_config.model.vocab_size is None
    exported = tmp_path / "bpe" / "final" / "tokenizer.json"
    reused_config = tiny_config(tmp_path / "reused", **{**bpe, "train.data.tokenizer": str(exported)})
    reused = train(reused_config)
    assert reused.config.model.vocab_size == 300
    for name in ("train/loss", "val/loss"):  # the same ids, so the same run
        assert column(read_metrics(tmp_path / "reused"), name) == column(read_metrics(tmp_path / "bpe"), name)


class _NaNLossAt(Callback):
    """Makes the model's loss NaN for the batches of optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        model.__dict__.pop("forward", None)
        if trainer.global_step == self.step - 1:
            forward = type(model).forward

            def nan_forward(*args, **kwargs):
                out = forward(model, *args, **kwargs)
                out.loss = out.loss * float("nan")
                return out

            model.forward = nan_forward


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, **{"train.max_steps": 6, "train.checkpoint_every": 1})
    with pytest.raises(FloatingPointError, match="step 4"):
        train(config, callbacks=[_NaNLossAt(4)])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_nonfinite_loss_skipped_when_asked(tmp_path):
    config = tiny_config(tmp_path, **{"train.max_steps": 5, "train.skip_nonfinite": True})
    result = train(config, callbacks=[_NaNLossAt(3)])
    assert result.steps == 5 and result.module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in result.module.model.parameters())


class _NaNGradientAt(Callback):
    """Makes one gradient NaN, the loss staying finite, at each optimizer step in ``steps``."""

    def __init__(self, *steps):
        self.steps = steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 in self.steps:
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad[0] = float("nan")


def test_nonfinite_gradient_with_a_finite_loss_stops_or_is_skipped(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 3 .the loss was finite"):
        train(tiny_config(tmp_path / "stop", **{"train.max_steps": 5}), callbacks=[_NaNGradientAt(3)])
    result = train(tiny_config(tmp_path / "skip", **{"train.max_steps": 5, "train.skip_nonfinite": True}),
                   callbacks=[_NaNGradientAt(3)])
    assert result.steps == 5 and result.module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in result.module.model.parameters())


def test_too_many_skipped_steps_stop_the_run(tmp_path):
    config = tiny_config(tmp_path, **{"train.max_steps": 8, "train.skip_nonfinite": True,
                                      "train.max_skipped_fraction": 0.2})
    with pytest.raises(FloatingPointError, match=r"2 of the first 3 steps were skipped .*max_skipped_fraction=0\.2;"):
        train(config, callbacks=[_NaNGradientAt(2), _NaNLossAt(3)])
    with pytest.raises(ConfigError, match=r"train.max_skipped_fraction must be in \[0, 1\], got 1.5"):
        tiny_config(tmp_path, **{"train.max_skipped_fraction": 1.5})


def test_skipped_batch_leaves_no_counts_for_the_next_update(tmp_path, counting_ffn):
    config = tiny_config(tmp_path, **{"model.ffn": {"type": counting_ffn, "n_experts": 4}, "train.max_steps": 4,
                                      "train.val_check_interval": 4, "train.skip_nonfinite": True})
    result = train(config, callbacks=[_NaNLossAt(2)])
    assert result.module.skipped_steps == 1
    ffn = result.module.model.blocks[0].ffn
    # Lightning still runs the (empty) optimizer step of a skipped batch: its hook must find nothing counted
    assert [load.sum().item() for load in ffn.step_loads] == [8 * 32, 0, 8 * 32, 8 * 32]


def test_ddp_two_processes_equal_one_process_double_batch(tmp_path):
    common = {"train.max_steps": 3, "train.val_check_interval": 3, "train.checkpoint_every": 3}
    single = train(tiny_config(tmp_path / "one", **common))
    overrides = [f"{k}={v}" for k, v in {"train.out_dir": tmp_path / "two", "train.batch_size": 4,
                                         "train.trainer.devices": 2, "train.trainer.strategy": "ddp"}.items()]
    flat = [f"{k}={v if not isinstance(v, dict) else _flow(v)}" for k, v in {**TINY, **common}.items()
            if k != "model.vocab_size"]
    proc = subprocess.run([sys.executable, "train.py", "--config", "dense-tiny", "model.vocab_size=null", *flat,
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_metrics(tmp_path / "two")
    assert column(two, "train/loss")[3] == pytest.approx(column(read_metrics(tmp_path / "one"), "train/loss")[3],
                                                         abs=1e-5)
    assert column(two, "val/loss")[3] == pytest.approx(single.val_loss, abs=1e-5)
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def _train_py(out_dir: Path, **overrides) -> list[str]:
    """The ``train.py`` command line of a tiny run into ``out_dir``."""
    settings = {**TINY, "train.out_dir": out_dir, **overrides}
    return [sys.executable, str(ROOT / "train.py"), "--config", "dense-tiny", "model.vocab_size=null",
            *(f"{k}={_flow(v) if isinstance(v, dict) else v}" for k, v in settings.items() if k != "model.vocab_size")]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) or timed out before the condition: {err[-3000:]}")
        time.sleep(0.05)


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    proc = subprocess.Popen(_train_py(tmp_path, **{"train.max_steps": 100_000, "train.checkpoint_every": 1,
                                                   "train.val_check_interval": 100_000}),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    _wait_for(checkpoint.is_file, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: finishing this step" in out
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 1 <= step < 100_000 and f"stopped at step {step}" in out
    assert not (tmp_path / "final").exists() and not list(checkpoint.parent.glob(".last.ckpt.tmp-*"))


_CHILD = """
import os, resource, signal, sys
from lightning.pytorch.callbacks import Callback
import zoo
from test_training import TINY
from zoo.train.run import train

class AtStep(Callback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.action()

def limit_file_size(limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""


def _run_child(script: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Runs ``script`` after :data:`_CHILD`'s imports in a fresh interpreter (this module importable)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", _CHILD + script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_metric_rows_survive_a_hard_kill_and_the_resume_keeps_them(tmp_path):
    overrides = {"train.max_steps": 100, "train.checkpoint_every": 2, "train.val_check_interval": 100}
    proc = _run_child(f"""
config = zoo.load_config("dense-tiny", {{**TINY, "train.out_dir": {str(tmp_path)!r}, **{overrides!r}}})
train(config, callbacks=[AtStep(5, lambda: os.kill(os.getpid(), signal.SIGKILL))])  # killed before step 6
""")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(column(read_metrics(tmp_path), "train/loss")) == [1, 2, 3, 4, 5]  # each row on disk when logged
    assert (tmp_path / LOCK_FILE).is_file()  # the dead run's lock: taken over by the resume

    resumed = train(tiny_config(tmp_path, **{**overrides, "train.max_steps": 6, "train.val_check_interval": 6,
                                              "train.sample_tokens": 0, "train.resume": True}))
    assert resumed.steps == 6
    assert sorted(column(read_metrics(tmp_path), "train/loss")) == [1, 2, 3, 4, 5, 6]  # 5 again, from step 4's state


def test_failed_metrics_rewrite_keeps_the_history(tmp_path, monkeypatch):
    history = "step,train/loss\n1,5.0\n2,4.0\n3,3.0\n"
    (tmp_path / "metrics.csv").write_text(history)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        ResumableCSVLogger(tmp_path, keep_until_step=2).experiment
    assert (tmp_path / "metrics.csv").read_text() == history and sorted(os.listdir(tmp_path)) == ["metrics.csv"]


def test_full_disk_at_a_checkpoint_removes_the_partial_file_and_says_what_was_needed(tmp_path):
    overrides = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.val_check_interval": 100}
    proc = _run_child(f"""
config = zoo.load_config("dense-tiny", {{**TINY, "train.out_dir": {str(tmp_path)!r}, **{overrides!r}}})
try:
    train(config, callbacks=[AtStep(0, lambda: limit_file_size(50_000))])  # ~200 kB checkpoints
except OSError as err:
    print(f"ERROR {{err.errno}}: {{err}}")
    sys.exit(3)
""")
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stdout[proc.stdout.index("ERROR"):]
    assert f"ERROR {errno.EFBIG}:" in message and "step-2 checkpoint" in message and ".last.ckpt.tmp-" in message
    needed = int(re.search(r"needs about ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert needed > 50_000 and "keeps the previous state" in message
    assert os.listdir(tmp_path / "checkpoints") == []  # no partial file
    assert sorted(column(read_metrics(tmp_path), "train/loss")) == [1]  # step 2's row comes after its checkpoint


def _flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def _cli():
    spec = importlib.util.spec_from_file_location("zoo_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_print_config_and_bad_override(capsys):
    main = _cli()
    assert main(["--config", "dense-tiny", "--print-config", "model.n_layers=2", "train.optimizer.lr=1e-3"]) == 0
    printed = zoo.ZooConfig.from_dict(__import__("yaml").safe_load(capsys.readouterr().out))
    assert printed.model.n_layers == 2 and printed.train.optimizer.lr == 1e-3
    assert main(["--config", "dense-tiny", "model.n_layrs=2"]) == 2
    assert "n_layers" in capsys.readouterr().err
    assert main(["--config", "dense-tiny", "train.data.seq_len=1024"]) == 2  # > model.max_seq_len
    assert "max_seq_len" in capsys.readouterr().err
    assert main(["--config", "dense-tiny", "train.resume=/nonexistent.ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_vocab_smaller_than_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train(tiny_config(tmp_path, **{"model.vocab_size": 200}))


def test_perplexity_of_a_huge_loss_is_inf_not_an_overflow():
    assert perplexity(1.0) == pytest.approx(math.e) and perplexity(709.0) == pytest.approx(math.exp(709.0))
    assert perplexity(710.0) == math.inf and perplexity(1e6) == math.inf and f"{perplexity(800.0):.2f}" == "inf"


def test_schedule_groups_and_maxvio():
    assert [lr_factor(s, 2, 10, 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 2, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 2, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, 0.1) == pytest.approx(0.55)
    model = zoo.create_model("dense-tiny", **{"n_layers": 1, "d_model": 32, "vocab_size": 257,
                                              "mixer": {"n_heads": 4, "n_kv_heads": 2}})
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and model.embed.weight in no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert max_violation(torch.tensor([[1.0, 1.0], [3.0, 1.0]])).item() == pytest.approx(0.25)


@pytest.mark.parametrize("preset", ["switch-tiny", "retnet-tiny", "deepseek-moe-tiny", "mtp-tiny"])
def test_weight_decay_groups_follow_modules_not_shapes(preset):
    model = zoo.create_model(preset, n_layers=2)
    names = {id(p): n for n, p in model.named_parameters()}

    def grouped(groups):
        return [sorted(names[id(p)] for p in g["params"]) for g in groups]

    decay, no_decay = grouped(param_groups(model, 0.1))
    assert decay and no_decay and len(decay) + len(no_decay) == len(names)
    for name in no_decay:
        leaf = name.rsplit(".", 1)[-1]
        assert "norm" in name or leaf.endswith("bias") or name.startswith("embed"), name
    assert all("norm" not in n and not n.endswith("bias") and not n.startswith("embed") for n in decay)
    with torch.no_grad():  # FSDP gives the optimizer flat 1-D parameters: the groups must not change
        for p in model.parameters():
            p.data = p.data.flatten()
    assert grouped(param_groups(model, 0.1)) == [decay, no_decay]


@pytest.fixture
def counting_ffn():
    """A toy top-1 routed FFN that reports loads, a metric and an aux loss, and records its
    ``on_optimizer_step`` calls (the contract the MoE blocks rely on)."""
    from dataclasses import dataclass

    from torch import nn

    from zoo import registry

    @dataclass
    class Config:
        n_experts: int = 4
        d_hidden: int = 0  # unused; lets the test config merge over the MLP defaults

    class CountingFFN(nn.Module):
        def __init__(self, config, ctx):
            super().__init__()
            self.router = nn.Linear(ctx.d_model, config.n_experts, bias=False)
            self.experts = nn.Linear(ctx.d_model, ctx.d_model * config.n_experts, bias=False)
            self.register_buffer("load", torch.zeros(config.n_experts), persistent=False)
            self.step_loads = []

        def forward(self, x, aux):
            choice = self.router(x).argmax(-1)  # (B, T)
            counts = torch.bincount(choice.flatten(), minlength=self.load.numel()).float()
            if self.training:
                self.load += counts
            aux.add_router_stats(counts)
            aux.add_metric("drop_fraction", torch.tensor(0.25))
            aux.add_loss("balance", 0.01 * self.router(x).float().pow(2).mean())
            y = self.experts(x).unflatten(-1, (self.load.numel(), -1))  # (B, T, E, d)
            return torch.gather(y, 2, choice[..., None, None].expand(*choice.shape, 1, x.shape[-1]))[:, :, 0]

        def on_optimizer_step(self, all_reduce):
            self.step_loads.append(all_reduce(self.load).clone())
            self.load.zero_()

    registry.register("ffn", "_counting_test_ffn", config=Config)(CountingFFN)
    yield "_counting_test_ffn"
    registry.unregister("ffn", "_counting_test_ffn")


def test_post_step_hook_and_router_metrics(tmp_path, counting_ffn):
    config = tiny_config(tmp_path, **{"model.ffn": {"type": counting_ffn, "n_experts": 4}, "train.max_steps": 4,
                                      "train.val_check_interval": 4, "train.batch_size": 4,
                                      "train.trainer.accumulate_grad_batches": 2})
    result = train(config)
    ffn = result.module.model.blocks[0].ffn
    assert len(ffn.step_loads) == 4  # once per optimizer step, after the whole accumulated batch
    assert all(load.sum().item() == 2 * 4 * 32 for load in ffn.step_loads)
    rows = read_metrics(tmp_path)
    assert column(rows, "train/drop_fraction")[4] == pytest.approx(0.25)
    assert column(rows, "train/aux_loss")[4] > 0
    assert set(column(rows, "train/maxvio")) == {1, 2, 3, 4} and 4 in column(rows, "val/maxvio")
    load = result.module.val_expert_load
    assert load.shape == (1, 4) and load.sum().item() == pytest.approx(1.0)
    assert column(rows, "val/maxvio")[4] == pytest.approx(max_violation(load).item())
    assert (tmp_path / "expert_load.png").stat().st_size > 0


def test_default_precision_clips_gradients_with_the_fused_optimizer(tmp_path):
    config = tiny_config(tmp_path, **{"train.precision": "bf16-mixed", "train.max_steps": 3,
                                      "train.val_check_interval": 3, "train.checkpoint_every": 3})
    assert config.train.trainer.gradient_clip_val > 0
    result = train(config)
    optimizer = result.module.optimizers().optimizer
    assert optimizer.defaults["fused"] and result.steps == 3 and math.isfinite(result.val_loss)


@pytest.mark.parametrize("cpuinfo, flags", [
    ("flags\t\t: fpu sse avx512f avx512bw\n", []),  # AVX-512 without BF16: emulated, so float32
    ("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n", ["avx512_bf16", "amx_bf16"]),
    ("Features\t: fp asimd sve bf16 i8mm\n", ["bf16"]),  # Arm
    ("", []),
])
def test_native_bf16_cpu_flags(cpuinfo, flags):
    assert cpu_bf16_flags(cpuinfo) == flags


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cuda_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU-X")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    picked, why = resolve_precision("auto")
    assert picked == ("bf16-mixed" if native else "32-true") and "GPU-X" in why
    assert resolve_precision("auto", "cpu")[1].startswith("CPU ")  # cpu asked for: the GPU is not consulted


def test_auto_precision_is_resolved_printed_and_recorded(tmp_path, capsys):
    config = tiny_config(tmp_path, **{"train.precision": "auto", "train.max_steps": 1, "train.val_check_interval": 1,
                                      "train.sample_tokens": 0})
    assert zoo.load_config("dense-tiny").train.precision == "auto"  # the default
    expected, why = resolve_precision("auto", config.train.trainer.accelerator)
    assert expected in ("bf16-mixed", "32-true") and why
    result = train(config)
    assert result.config.train.precision == expected and config.train.precision == "auto"
    assert f"train.precision: auto -> {expected} ({why})" in capsys.readouterr().out
    for written in (tmp_path / "run_config.yaml", tmp_path / "final" / "run_config.yaml"):
        assert zoo.load_config(written).train.precision == expected
    assert resolve_precision("16-mixed") == ("16-mixed", "as configured")


def test_moe_layers_with_different_expert_counts(tmp_path):
    moe = {"type": "moe", "n_experts": 4, "top_k": 2, "d_hidden": 16, "loss_free_bias": True}
    config = tiny_config(tmp_path, **{"model.n_layers": 2, "model.ffn": moe, "model.layers.1.ffn": {"n_experts": 8},
                                      "train.max_steps": 2, "train.val_check_interval": 2, "train.batch_size": 4})
    assert [config.model.layer_blocks(i)[1].options.n_experts for i in (0, 1)] == [4, 8]
    result = train(config)
    load = result.module.val_expert_load
    assert load.shape == (2, 8) and load[0, 4:].isnan().all() and not load[1].isnan().any()
    assert load.nansum(-1).tolist() == pytest.approx([1.0, 1.0])
    rows = read_metrics(tmp_path)
    assert set(column(rows, "train/maxvio")) == {1, 2}
    expected = (max_violation(load[0, :4]).item() + max_violation(load[1]).item()) / 2
    assert column(rows, "val/maxvio")[2] == pytest.approx(expected, rel=1e-5)
    assert moe_max_violation([torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 2.0])]) == pytest.approx(0.25)
    assert (tmp_path / "expert_load.png").stat().st_size > 0


def test_sigterm_to_rank_zero_stops_every_ddp_rank_with_a_checkpoint(tmp_path):
    """A scheduler's SIGTERM reaching only the launching process (rank 0) stops both DDP ranks at the same step
    (the stop decision is reduced over ranks), which save ``last.ckpt`` and exit; ``train.py`` exits 143."""
    proc = subprocess.Popen(_train_py(tmp_path, **{"train.max_steps": 100_000, "train.checkpoint_every": 1,
                                                   "train.val_check_interval": 100_000, "train.batch_size": 4,
                                                   "train.trainer.devices": 2, "train.trainer.strategy": "ddp"}),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    _wait_for(checkpoint.is_file, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 1 <= step < 100_000 and f"stopped at step {step}" in out
