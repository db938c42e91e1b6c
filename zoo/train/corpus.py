"""Corpora: the documents a run trains on, and the cache directory their tokenised forms live in.

A corpus is a list of documents: ``python-stdlib`` (the ``.py`` sources of the running interpreter's standard
library, tests excluded, ~12 MB), ``pydoc-topics`` (``pydoc_data.topics``, ~0.5 MB of English), a text file (cut
at line boundaries into ~4 KB documents), a folder of text files, or a glob. Documents are split into
train/validation by a seeded shuffle of whole documents (:func:`split_documents`). Nothing here imports Lightning,
so the ``zoo`` command can read corpora without it.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zoo.errors import ConfigError

EMBEDDED_CORPORA = ("python-stdlib", "pydoc-topics")
_PIECE_CHARS = 4096  # a single text file is cut at line boundaries into pieces of about this size
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}


def cache_dir() -> Path:
    """Where tokenizers and token arrays are cached: ``$ZOO_CACHE`` or ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo")


# --------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """A named list of documents: ``fingerprint`` changes whenever the documents may have changed,
    without reading them; ``load()`` reads them (in a fixed order)."""

    name: str
    fingerprint: str
    load: Callable[[], list[str]]


def get_corpus(spec: str) -> Corpus:
    """The corpus ``spec`` names: an embedded corpus, a text file, a folder or a glob pattern."""
    if spec == "python-stdlib":
        files = stdlib_files()
        return Corpus(spec, files_fingerprint(spec, files), lambda: [_read_text(p) for p in files])
    if spec == "pydoc-topics":
        return Corpus(spec, f"{spec}:{sys.version}", _pydoc_topics)
    path = Path(spec).expanduser()
    if path.is_file():
        return Corpus(spec, files_fingerprint("file", [path]), lambda: _cut_file(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise ConfigError(f"train.data.corpus: {spec!r} is neither an embedded corpus "
                          f"({', '.join(EMBEDDED_CORPORA)}) nor an existing file, folder or glob")
    if not files:
        raise ConfigError(f"train.data.corpus: {spec!r} matches no files")
    return Corpus(spec, files_fingerprint("files", files), lambda: _read_texts(files))


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(("test", "config-")))
        files += [Path(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata"))]
    return files


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def files_fingerprint(kind: str, files: list[Path]) -> str:
    digest = hashlib.sha256(kind.encode())
    for p in files:
        st = p.stat()
        digest.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _read_texts(files: list[Path]) -> list[str]:
    """The UTF-8 text files among ``files`` (binary files, which fail to decode, are skipped)."""
    texts = []
    for p in files:
        try:
            texts.append(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    if not texts:
        raise ConfigError(f"train.data.corpus: none of the {len(files)} files is UTF-8 text")
    return texts


def _cut_file(path: Path) -> list[str]:
    pieces, current, size = [], [], 0
    for line in _read_text(path).splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= _PIECE_CHARS:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices ``(train, val)``: a seeded permutation, its first ``round(val_fraction * n)``
    (at least one) documents for validation, each part back in corpus order."""
    if n_documents < 2:
        raise ConfigError(f"train.data.corpus has {n_documents} document(s); a train/validation split needs 2")
    order = np.random.default_rng(seed).permutation(n_documents)
    n_val = min(n_documents - 1, max(1, round(val_fraction * n_documents)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def cache_key(*parts) -> str:
    """A short stable hash of ``parts``: the name of a cache entry that depends on them."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


def atomic_write(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
