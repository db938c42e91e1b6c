"""Checkpoints and the Hub: save/load, sharding, atomic writes, safety, model card, and push/pull through
the real ``huggingface_hub`` client against the local Hub-compatible server in ``tests/hub_server.py``.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, at import, so the Hub
scenarios run in subprocesses given exactly those environment variables, as a user would set them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import zoo
from zoo.checkpoint.files import read_state_dict
from zoo.errors import CheckpointError
from zoo.model import ZooModel
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layers=2, d_model=32, max_seq_len=32, mixer={"n_heads": 2, "n_kv_heads": 1}, ffn={"d_hidden": 64})


def tiny_model(**fields):
    return zoo.create_model("dense-tiny", **{**TINY, **fields})


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, a.config.vocab_size, (2, 8))
    assert torch.equal(a(ids).logits, b(ids).logits)


# --------------------------------------------------------------------------- local checkpoints


def test_round_trip_writes_card_and_loads_identical(tmp_path):
    model = tiny_model(tie_embeddings=False)
    model.save_pretrained(tmp_path / "ckpt", training={"steps": 123, "val_loss": 1.2345})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    assert_same_model(model, zoo.from_pretrained(tmp_path / "ckpt"))
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: zoo" in card and "license: apache-2.0" in card
    assert "mixer-attention" in card and "ffn-mlp" in card
    assert f"{model.num_parameters():,} total" in card and "steps: 123" in card and "1.2345" in card


def test_sharded_save_and_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "ckpt" / s).is_file() for s in shards)
    assert_same_model(model, zoo.from_pretrained(tmp_path / "ckpt"))


def _sharded_with_shard_name(tmp_path, name: str) -> Path:
    """A sharded checkpoint whose index names ``name`` for every tensor, and a valid shard outside it."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    (tmp_path / "outside").mkdir()
    model.save_pretrained(tmp_path / "outside" / "ckpt")  # a readable file, were the index obeyed
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {key: name for key in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("name", ["../outside/ckpt/model.safetensors", "ABSOLUTE",
                                  "x/../../outside/ckpt/model.safetensors", "link/ckpt/model.safetensors"])
def test_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside" / "ckpt" / "model.safetensors")
    directory = _sharded_with_shard_name(tmp_path, name)
    (directory / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*not a file inside.*refused"):
        zoo.from_pretrained(directory)


@pytest.mark.parametrize("file, content", [
    ("model.safetensors.index.json", b'{"metadata": {}}'),
    ("model.safetensors.index.json", b'[1, 2]'),
    ("model.safetensors.index.json", b'{"weight_map": ["model-00001-of-00002.safetensors"]}'),
    ("model.safetensors.index.json", b'{"weight_map": {"embed.weight": 7}}'),
    ("model.safetensors.index.json", b'{"weight_map": {"\xff\xfe": 1}}'),
    ("config.json", b'["not", "a", "config"]'),
    ("config.json", b'\xff\xfe{}'),
], ids=["no-weight-map", "list", "map-is-list", "map-value-int", "bad-utf8", "config-list", "config-bad-utf8"])
def test_malformed_index_or_config_names_the_file(tmp_path, file, content):
    tiny_model().save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    (tmp_path / "ckpt" / file).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"ckpt/{file.replace('.', '[.]')}"):
        zoo.from_pretrained(tmp_path / "ckpt")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = tiny_model()
    old.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    new = tiny_model()
    monkeypatch.setattr("zoo.checkpoint.pretrained.model_card", crash)  # fails after the weights are written
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the staging directory is gone
    assert_same_model(old, zoo.from_pretrained(tmp_path / "ckpt"))


def test_save_refuses_to_replace_a_directory_holding_other_files(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not a checkpoint directory .*: notes.txt\. Nothing was written"):
        tiny_model().save_pretrained(project)
    assert [p.name for p in project.iterdir()] == ["notes.txt"] and (project / "notes.txt").read_text() == "precious"

    old = tiny_model()
    old.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("precious")
    (tmp_path / "ckpt" / "data").mkdir()
    with pytest.raises(FileExistsError, match="holds files that are not part of a zoo checkpoint: data/, notes.txt"):
        tiny_model().save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "precious" and (tmp_path / "ckpt" / "data").is_dir()
    assert_same_model(old, zoo.from_pretrained(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "project"]  # nothing staged was left


def test_save_replaces_a_checkpoint_with_exactly_the_new_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt, max_shard_size=20_000, extra_files={"tokenizer.json": "{}", "vocab.txt": "a"})
    new = tiny_model()
    with pytest.raises(FileExistsError, match="not part of a zoo checkpoint: vocab.txt"):  # not an extra file now
        new.save_pretrained(ckpt)
    new.save_pretrained(ckpt, extra_files={"vocab.txt": "b"})  # the shards, the index and tokenizer.json go
    assert sorted(p.name for p in ckpt.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.txt"]
    assert_same_model(new, zoo.from_pretrained(ckpt))
    (tmp_path / "empty").mkdir()
    new.save_pretrained(tmp_path / "empty")
    assert_same_model(new, zoo.from_pretrained(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        new.save_pretrained(tmp_path / "file")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_save_fsyncs_the_files_before_the_rename(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    import zoo.checkpoint.files as files

    exchange = files._exchange

    def recording_exchange(a, b):  # the atomic swap of a replacement, where the system has one
        events.append(("replace", str(a), str(b)))
        return exchange(a, b)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(files, "_exchange", recording_exchange)
    tiny_model().save_pretrained(tmp_path / "ckpt", extra_files={"tokenizer.json": "{}"})
    install = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / "ckpt"))
    staging = events[install][1]
    synced_before = {e[1] for e in events[:install] if e[0] == "fsync"}
    assert {f"{staging}/{p.name}" for p in (tmp_path / "ckpt").iterdir()} | {staging} <= synced_before
    assert ("fsync", str(tmp_path)) in events[install:]  # the rename itself is made durable


def test_leftovers_of_a_hard_kill_do_not_disturb_later_saves(tmp_path):
    old = tiny_model()
    old.save_pretrained(tmp_path / "ckpt")
    staging = tmp_path / ".ckpt.tmp-0123456789abcdef0123456789abcdef"  # killed while writing
    staging.mkdir()
    (staging / "config.json").write_text("{")
    (staging / "model.safetensors").write_bytes(b"\0" * 16)
    assert_same_model(old, zoo.from_pretrained(tmp_path / "ckpt"))
    new = tiny_model()
    new.save_pretrained(tmp_path / "ckpt")
    assert_same_model(new, zoo.from_pretrained(tmp_path / "ckpt"))
    retired = tmp_path / ".other.old-0123456789abcdef0123456789abcdef"  # killed between the two renames
    os.replace(tmp_path / "ckpt", retired)
    new.save_pretrained(tmp_path / "other")
    assert_same_model(new, zoo.from_pretrained(tmp_path / "other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([staging.name, retired.name, "other"])


def test_untied_head_is_not_dropped_by_a_tied_config(tmp_path):
    model = tiny_model(tie_embeddings=False)
    model.save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model": {**config["model"], "tie_embeddings": True}}))
    with pytest.raises(CheckpointError, match="'head.weight' that differs from 'embed.weight'.*tie_embeddings"):
        zoo.from_pretrained(tmp_path / "ckpt")

    with torch.no_grad():
        model.head.weight.copy_(model.embed.weight)  # an untied checkpoint whose head equals the embedding
    model.save_pretrained(tmp_path / "equal")
    (tmp_path / "equal" / "config.json").write_text(config_file.read_text())
    tied = zoo.from_pretrained(tmp_path / "equal")
    assert tied.head.weight is tied.embed.weight and torch.equal(tied.embed.weight, model.embed.weight)


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["ffn"]["d_hidden"] = 96
    config["model"]["n_layers"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        zoo.from_pretrained(tmp_path / "ckpt")
    message = str(err.value)
    assert "missing tensors" in message and "blocks.2.mixer.qkv.weight" in message
    assert "blocks.0.ffn.gate_up.weight: checkpoint (128, 32) vs model (192, 32)" in message


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["blocks.0.extra"] = torch.zeros(2)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['blocks.0.extra'\]"):
        zoo.from_pretrained(tmp_path / "ckpt")


def test_truncated_safetensors_fails_with_file_name(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors file"):
        zoo.from_pretrained(tmp_path / "ckpt")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        zoo.from_pretrained(tmp_path / "ckpt")


class _Exploit:
    """A pickle that, when loaded by an unsafe unpickler, writes a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_malicious_pickle_is_not_executed(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(model.config.to_json())
    target = tmp_path / "pwned.txt"
    refused = r"refused to load .*pytorch_model.bin.*non-tensor objects \(.*pathlib.*\); pickled code is never executed"
    for legacy in (False, True):  # torch's zip format, and the pre-1.6 bare-pickle format
        torch.save({"embed.weight": _Exploit(str(target))}, ckpt / "pytorch_model.bin",
                   _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=refused):
            zoo.from_pretrained(ckpt)
        assert not target.exists()
    with open(ckpt / "pytorch_model.bin", "wb") as f:  # a plain pickle, not written by torch.save
        pickle.dump(_Exploit(str(target)), f)
    with pytest.raises(CheckpointError, match=refused):
        zoo.from_pretrained(ckpt)
    assert not target.exists()


def test_plain_bin_checkpoint_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    state = read_state_dict(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    assert_same_model(model, zoo.from_pretrained(tmp_path / "ckpt"))


def test_legacy_format_bin_checkpoint_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    state = read_state_dict(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same_model(model, zoo.from_pretrained(tmp_path / "ckpt"))


@pytest.mark.parametrize("legacy", [False, True])
def test_corrupt_bin_is_reported_as_corrupt(tmp_path, legacy):
    torch.save({"w": torch.randn(4, 4), "b": torch.arange(3)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    for damaged in [data[:cut] for cut in range(0, len(data), 23)] + [b"\0" * len(data)]:
        (tmp_path / "pytorch_model.bin").write_bytes(damaged)
        with pytest.raises(CheckpointError, match=r"corrupt or truncated file .*pytorch_model.bin"):
            read_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(data)
    assert torch.equal(read_state_dict(tmp_path)["b"], torch.arange(3))


def test_missing_directory_and_preset_without_repo():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.from_pretrained("./no/such/dir")
    with pytest.raises(ValueError, match="no hub.repo_id"):
        zoo.create_model("dense-tiny", pretrained=True)


# --------------------------------------------------------------------------- the Hub


@pytest.fixture
def hub():
    server = HubServer(token="hf_test_token").start()
    yield server
    server.stop()


def run_client(script: str, hub: HubServer, hf_home: Path, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    environment.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_TOKEN=hub.token,
                       HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
                       OMP_NUM_THREADS="1", **env)
    prelude = textwrap.dedent("""
        import torch, zoo
        from test_hub import TINY, assert_same_model, tiny_model
        torch.manual_seed(0)
    """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_push_pull_revisions_and_offline(hub, tmp_path):
    run_client(f"""
        first = tiny_model()
        info1 = first.push_to_hub("org/tiny", private=True, commit_message="first")
        pulled = zoo.from_pretrained("org/tiny")
        assert_same_model(first, pulled)

        second = tiny_model()
        second.push_to_hub("org/tiny", commit_message="second")
        assert_same_model(second, zoo.from_pretrained("org/tiny"))
        assert_same_model(first, zoo.from_pretrained("org/tiny", revision=info1.oid))
        assert_same_model(second, zoo.create_model("hf-hub:org/tiny"))
        assert_same_model(second, zoo.create_model("dense-tiny", pretrained=True,
                                                   overrides={{"hub.repo_id": "org/tiny"}}, **TINY))
        torch.save(second.state_dict(), r"{tmp_path / 'second.pt'}")

        from zoo.train.run import train  # train.py pushes its final export when hub.push is set
        run = train(zoo.load_config("dense-tiny", {{
            **{{f"model.{{k}}": v for k, v in TINY.items()}}, "model.n_layers": 1,
            "train.data": {{"corpus": "pydoc-topics", "tokenizer": "bytes", "seq_len": 16}},
            "train.batch_size": 2, "train.max_steps": 2, "train.val_check_interval": 2, "train.val_batches": 1,
            "train.sample_tokens": 0, "train.precision": "32-true", "train.out_dir": r"{tmp_path / 'run'}",
            "hub.repo_id": "org/trained", "hub.push": True}}))
        assert_same_model(zoo.from_pretrained(run.out_dir / "final"), zoo.from_pretrained("org/trained"))

        import pytest
        from huggingface_hub.errors import RepositoryNotFoundError
        with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
            zoo.from_pretrained("org/tiny", token=False, cache_dir=r"{tmp_path / 'other-cache'}")
        with pytest.raises(Exception, match="401"):
            tiny_model().push_to_hub("org/other", token="hf_wrong")
    """, hub, tmp_path / "hf")
    puts = [path for method, path in hub.requests if method == "PUT"]
    assert len(puts) == 3 and all(p.startswith("/lfs-upload/") for p in puts)  # weights went through LFS
    assert len(hub.repos["org/tiny"].commits) == 3 and hub.repos["org/tiny"].private
    assert "README.md" in hub.repos["org/tiny"].commits[hub.repos["org/tiny"].branches["main"]]
    trained = hub.repos["org/trained"].commits[hub.repos["org/trained"].branches["main"]]
    assert {"tokenizer.json", "README.md", "config.json", "model.safetensors"} <= set(trained)
    assert "steps: 2" in trained["README.md"].data.decode()

    seen = len(hub.requests)
    run_client(f"""
        import pytest
        second = tiny_model()
        second.load_state_dict(torch.load(r"{tmp_path / 'second.pt'}", weights_only=True))
        assert_same_model(second, zoo.from_pretrained("org/tiny"))
        with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
            zoo.from_pretrained("org/never-pushed")
    """, hub, tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert len(hub.requests) == seen  # offline: not one request



def test_hub_index_naming_a_shard_outside_the_snapshot_is_refused(hub, tmp_path):
    victim = tmp_path / "victim"
    run_client(f"""
        import json, pytest
        from huggingface_hub import HfApi
        from zoo.errors import CheckpointError
        tiny_model().save_pretrained(r"{victim}")
        model = tiny_model()
        model.push_to_hub("org/evil", max_shard_size=20_000)
        assert_same_model(model, zoo.from_pretrained("org/evil"))  # sharded: the snapshot's files are symlinks
        index = {{"weight_map": {{"embed.weight": r"{victim / 'model.safetensors'}"}}}}
        HfApi().upload_file(path_or_fileobj=json.dumps(index).encode(), path_in_repo="model.safetensors.index.json",
                            repo_id="org/evil")
        with pytest.raises(CheckpointError, match="not a file inside .* refused"):
            zoo.from_pretrained("org/evil")
        index = {{"weight_map": {{"embed.weight": "../../blobs/x.safetensors"}}}}
        HfApi().upload_file(path_or_fileobj=json.dumps(index).encode(), path_in_repo="model.safetensors.index.json",
                            repo_id="org/evil")
        with pytest.raises(CheckpointError, match="not a file inside .* refused"):
            zoo.from_pretrained("org/evil")
    """, hub, tmp_path / "hf")


def corrupt_cached_weights_and_expect_an_error(hf_home: str, repo_id: str) -> None:
    """Flip a byte of ``repo_id``'s cached model.safetensors blob under ``hf_home``; loading must then fail
    naming the file and both sha256s, and remove the blob and its snapshot link. Run in a Hub client."""
    from zoo.errors import CheckpointError

    snapshot = next(Path(hf_home).glob(f"hub/models--{repo_id.replace('/', '--')}/snapshots/*"))
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    expected = rf"model.safetensors .*corrupt: its sha256 is [0-9a-f]{{64}}, but the Hub's is {blob.name}.*removed"
    with pytest.raises(CheckpointError, match=expected):
        zoo.from_pretrained(repo_id)
    assert not blob.exists() and not (snapshot / "model.safetensors").exists()


def test_corrupted_cached_weights_are_detected_removed_and_downloaded_again(hub, tmp_path):
    """A flipped byte in a cached LFS blob is caught by its sha256 (the blob's name), offline too, and the
    corrupted copy is removed, so the next online load downloads the original again."""
    run_client(f"""
        from test_hub import corrupt_cached_weights_and_expect_an_error
        model = tiny_model()
        model.push_to_hub("org/tiny")
        assert_same_model(model, zoo.from_pretrained("org/tiny"))
        corrupt_cached_weights_and_expect_an_error(r"{tmp_path / 'hf'}", "org/tiny")
        assert_same_model(model, zoo.from_pretrained("org/tiny"))  # downloaded again
    """, hub, tmp_path / "hf")
    seen = len(hub.requests)
    run_client(f"""
        from test_hub import corrupt_cached_weights_and_expect_an_error
        corrupt_cached_weights_and_expect_an_error(r"{tmp_path / 'hf'}", "org/tiny")
    """, hub, tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert len(hub.requests) == seen  # the check needs no network


def test_push_replaces_the_checkpoint_and_keeps_other_files(hub, tmp_path):
    config = {**{f"model.{k}": v for k, v in TINY.items()}, "hub.repo_id": "org/swap"}
    run_client(f"""
        import pytest
        from huggingface_hub import HfApi
        api = HfApi()
        sharded, single, resharded = tiny_model(), tiny_model(), tiny_model()
        first = sharded.push_to_hub("org/swap", max_shard_size=20_000)
        api.upload_file(path_or_fileobj=b"our notes", path_in_repo="NOTES.md", repo_id="org/swap")
        api.upload_file(path_or_fileobj=b"not ours", path_in_repo="extra/model.safetensors", repo_id="org/swap")
        second = single.push_to_hub("org/swap")
        assert sorted(api.list_repo_files("org/swap")) == [".gitattributes", "NOTES.md", "README.md", "config.json",
                                                         "extra/model.safetensors", "model.safetensors"]
        assert_same_model(single, zoo.from_pretrained("org/swap"))
        resharded.push_to_hub("org/swap", max_shard_size=20_000)
        files = api.list_repo_files("org/swap")
        assert "model.safetensors" not in files and "model.safetensors.index.json" in files and "NOTES.md" in files
        assert_same_model(resharded, zoo.from_pretrained("org/swap"))

        # create_model downloads at a revision and can drop MTP modules, for hf-hub: names and presets alike
        assert_same_model(sharded, zoo.create_model("hf-hub:org/swap", revision=first.oid))
        assert_same_model(single, zoo.create_model("dense-tiny", pretrained=True, revision=second.oid,
                                                   overrides={config!r}))
        tiny_model(mtp={{"depth": 1}}).push_to_hub("org/mtp")
        assert zoo.create_model("hf-hub:org/mtp", drop_mtp=True).mtp is None
        with pytest.raises(ValueError, match="pretrained=True"):
            zoo.create_model("dense-tiny", revision="main")

        fp8 = tiny_model()
        fp8.push_to_hub("org/fp8", weights_format="fp8")
        dequantised = zoo.from_pretrained("org/fp8")
        weight, original = dequantised.blocks[0].ffn.down.weight, fp8.blocks[0].ffn.down.weight
        assert weight.dtype == torch.float32 and 0 < (weight - original).abs().max() / original.abs().max() < 0.1
        assert_same_model(dequantised, zoo.create_model("hf-hub:org/fp8"))
        assert_same_model(dequantised, zoo.create_model("hf-hub:org/fp8", overrides={{"train.max_steps": 7}}))
        assert_same_model(dequantised, zoo.create_model("dense-tiny", pretrained=True,
                                                        overrides={{"hub.repo_id": "org/fp8"}}, **TINY))
    """, hub, tmp_path / "hf")
    assert len(hub.repos["org/swap"].commits) == 6  # creation, 2 user uploads, and one commit per push


def test_skeleton_has_the_model_shapes_and_leaves_torch_init_alone(monkeypatch):
    """The skeleton is built on meta with nothing patched: torch.nn.init is the same while the model is
    constructed and afterwards."""
    from zoo.model.build import build_skeleton

    originals = dict(vars(torch.nn.init))
    seen = []

    def construct(config):
        seen.append(dict(vars(torch.nn.init)))
        return ZooModel(config)

    config = zoo.load_config("deepseek-moe-tiny", {"model.n_layers": 2})
    monkeypatch.setattr(zoo.model.build, "ZooModel", construct)
    skeleton = build_skeleton(config.model)
    reference = zoo.build_model(config)
    shapes = {n: p.shape for n, p in reference.state_dict().items()}
    assert {n: p.shape for n, p in skeleton.state_dict().items()} == shapes
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert len(seen) == 2 and all(during == originals for during in seen)
    assert dict(vars(torch.nn.init)) == originals


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_a_checkpoint_read_while_it_is_resaved_is_never_a_mix(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:  # two renames: the directory is briefly missing, and readers wait for it
        monkeypatch.setattr("zoo.checkpoint.files._exchange", lambda a, b: False)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(tiny_model())
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    path = tmp_path / "ckpt"
    models[0].save_pretrained(path, max_shard_size="8KB")  # several shards: a mix is possible
    assert len(list(path.glob("model-*.safetensors"))) > 2
    stop, errors = threading.Event(), []

    def resave():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                models[i % 2].save_pretrained(path, max_shard_size="8KB")
            except Exception as err:  # noqa: BLE001  (reported by the main thread)
                errors.append(err)

    writer = threading.Thread(target=resave)
    writer.start()
    seen, deadline = set(), time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            loaded = zoo.from_pretrained(path).state_dict()
            matches = [all(torch.equal(loaded[k], s[k]) for k in s) for s in states]
            assert any(matches), "a load mixed the tensors of two checkpoints"
            seen.add(matches.index(True))
    finally:
        stop.set()
        writer.join()
    assert not errors and seen == {0, 1}
