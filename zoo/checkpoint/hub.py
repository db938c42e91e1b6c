"""Hub transfers through ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_commit``), so
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and revisions work as
for any Hub library. A push replaces the repo's checkpoint files in one commit and keeps its other files.
A pulled snapshot's weights are checked against the sha256 the Hub gave them before they are loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from zoo.checkpoint.files import ADAPTER_CONFIG, being_replaced, is_checkpoint_file, wait_for_replacement
from zoo.errors import CheckpointError

HUB_PREFIX = "hf-hub:"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "README.md", "tokenizer*", "*.model", "*.txt"]
_WEIGHTS_SUFFIXES = (".safetensors", ".bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def upload_checkpoint(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                      token: str | None = None, commit_message: str = "Upload zoo model",
                      revision: str | None = None):
    """Commit a checkpoint directory written by :func:`save_pretrained` to the Hub repo ``repo_id``
    (created if missing); ``train.py`` calls this with the final export when ``hub.push`` is set.

    The push replaces the checkpoint in the repo exactly, in one commit: it adds the folder's files and
    deletes the repo's other top-level checkpoint files (older shards and index, ``pytorch_model*.bin``,
    a ``tokenizer.json`` the new checkpoint lacks), so that a pull never mixes two checkpoints. Other
    files (``.gitattributes``, a user's docs, anything in a subfolder) are kept. The commit names the
    head it was computed from as its parent, so a concurrent commit makes it fail instead of being undone."""
    folder = Path(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    stale = sorted(f.rfilename for f in head.siblings or []
                   if "/" not in f.rfilename and is_checkpoint_file(f.rfilename) and f.rfilename not in files)
    operations = [*(CommitOperationDelete(name) for name in stale),
                  *(CommitOperationAdd(name, folder / name) for name in files)]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision,
                             parent_commit=head.sha)


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, *,
                       token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory of a checkpoint: ``path_or_repo_id`` itself if it is a directory, else the
    Hub snapshot of that repo at ``revision`` (downloaded into the cache, or found there offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir() or being_replaced(path):
        wait_for_replacement(path)  # read_checkpoint then retries a read that a replacement overtakes
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file() and not being_replaced(path):
            raise CheckpointError(f"{str(path)!r} has no config.json (nor {ADAPTER_CONFIG}), so it is not a "
                                  "checkpoint directory")
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.startswith(HUB_PREFIX):
        repo_id = repo_id[len(HUB_PREFIX):]
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory {repo_id!r} does not exist (and it is no Hub repo id)")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                          allow_patterns=_DOWNLOAD_PATTERNS))
        if not any(snapshot.glob("*.safetensors")):  # old repos: PyTorch pickles, read with weights_only
            snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                              allow_patterns=[*_DOWNLOAD_PATTERNS, "*.bin"]))
    except LocalEntryNotFoundError as err:
        where = cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
                                    f"{where} and HF_HUB_OFFLINE=1 forbids downloading it") from err
        raise FileNotFoundError(f"{repo_id!r} (revision {revision or 'main'}) could not be downloaded from "
                                f"{constants.ENDPOINT} and is not in the cache {where}: {err}") from err
    if not (snapshot / "config.json").is_file() and not (snapshot / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no config.json "
                              f"(nor {ADAPTER_CONFIG})")
    verify_snapshot(snapshot)
    return snapshot


def verify_snapshot(snapshot: Path) -> None:
    """Check each weights file of the Hub cache snapshot ``snapshot`` against the sha256 the Hub gave it.

    The cache keeps a snapshot's files as links to ``blobs/<etag>``, and an LFS file's etag is the sha256 of
    its content, so the expected hash is the blob's name: the check needs no network. A blob with another
    name (a git oid, or a copy where the system has no symlinks) carries no sha256 and is not checked. A
    corrupted blob is deleted with its link, so that the next online load downloads it again, and
    CheckpointError names the file and both hashes."""
    for link in sorted(p for p in snapshot.rglob("*") if p.name.endswith(_WEIGHTS_SUFFIXES)):
        blob = link.resolve()
        if not (_SHA256.fullmatch(blob.name) and blob.parent.name == "blobs" and blob.is_file()):
            continue
        actual = _sha256(blob)
        if actual != blob.name:
            blob.unlink(missing_ok=True)  # another process may have removed it first
            link.unlink(missing_ok=True)
            raise CheckpointError(f"{link} in the Hugging Face cache is corrupt: its sha256 is {actual}, but the "
                                  f"Hub's is {blob.name}. The corrupted cached copy ({blob}) was removed, so "
                                  f"loading the model again downloads it anew")


def _sha256(path: Path, chunk_size: int = 1 << 24) -> str:
    """The sha256 hex digest of the file ``path``, read in chunks so that a large shard needs little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
