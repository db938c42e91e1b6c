"""``python-docs``: the embedded instruction and preference set, built from the running interpreter's standard
library like the ``python-stdlib`` corpus (:mod:`zoo.train.data`), with no download.

For every public top-level function and class of a module (``ast``-parsed, never imported) whose docstring has
a summary line, one instruction pair: ``What does json.dumps do?`` answered by that summary (PEP 257: "the
first line should be a short summary"). A preference record pairs the same question with the right summary
(``chosen``) and the summary of a sibling of the same module (``rejected``: the next documented object in
source order with another summary), so that only knowing the object, not the module's style, tells them
apart. Modules are split between training and validation by a seeded shuffle, so no module has pairs on both
sides and validation asks about objects of modules never seen in training. The records of the whole library
are cached as JSON under the cache directory, keyed by the library's files.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np

from zoo.train.corpus import atomic_write, cache_dir, cache_key, files_fingerprint, stdlib_files

EMBEDDED_SET = "python-docs"
_FORMAT = "zoo-python-docs-v1"  # bump when the records or their choice change
_MIN_CHARS, _MAX_CHARS = 12, 200  # summaries outside this length are not answers (empty, or a whole paragraph)


def question(name: str) -> str:
    return f"What does {name} do?"


def module_entries(path: Path, module: str) -> list[tuple[str, str]]:
    """``(qualified name, summary line)`` of the documented public top-level functions and classes of the
    source file ``path`` (module ``module``), in source order."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    entries = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        summary = doc.strip().split("\n\n")[0].split("\n")[0].strip() if doc else ""
        if _MIN_CHARS <= len(summary) <= _MAX_CHARS and not summary.startswith(f"{node.name}("):
            entries.append((f"{module}.{node.name}", summary))
    return entries


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_records(files: list[Path], root: Path) -> dict[str, list[tuple[str, str]]]:
    """Module name -> its entries (:func:`module_entries`), for the modules with at least one."""
    modules = {}
    for path in files:
        name = module_name(path, root)
        entries = module_entries(path, name)
        if entries:
            modules[name] = entries
    return modules


def stdlib_modules() -> dict[str, list[tuple[str, str]]]:
    """:func:`build_records` of the whole standard library (the ``python-stdlib`` files), cached."""
    files = stdlib_files()
    path = cache_dir() / "instructions" / f"{cache_key(_FORMAT, files_fingerprint('python-docs', files))}.json"
    if path.is_file():
        return {name: [tuple(e) for e in entries] for name, entries in json.loads(path.read_text()).items()}
    modules = build_records(files, Path(sysconfig.get_paths()["stdlib"]))
    atomic_write(path, json.dumps(modules).encode())
    return modules


def split_modules(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` module names: a seeded permutation of the sorted names, its first
    ``round(val_fraction * n)`` (at least one) for validation."""
    names = sorted(names)
    if len(names) < 2:
        raise ValueError(f"{len(names)} module(s) with documented objects; a train/validation split needs 2")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return sorted(names[i] for i in order[n_val:]), sorted(names[i] for i in order[:n_val])


def chat_records(modules: dict[str, list[tuple[str, str]]], names: list[str]) -> list[dict]:
    """One ``{"messages": [user question, assistant summary]}`` record per entry of the modules ``names``."""
    return [{"messages": [{"role": "user", "content": question(obj)}, {"role": "assistant", "content": summary}]}
            for name in names for obj, summary in modules[name]]


def preference_records(modules: dict[str, list[tuple[str, str]]], names: list[str]) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` records: the question, its summary, and the summary of the next
    entry of the same module (cyclically) whose summary differs; entries without such a sibling are left out."""
    records = []
    for name in names:
        entries = modules[name]
        for i, (obj, summary) in enumerate(entries):
            sibling = next((s for _, s in entries[i + 1:] + entries[:i] if s != summary), None)
            if sibling is not None:
                records.append({"prompt": question(obj), "chosen": summary, "rejected": sibling})
    return records
