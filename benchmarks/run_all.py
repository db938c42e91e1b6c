"""Run every benchmark script, then regenerate ``RESULTS.md`` from the results JSON.

``python -m benchmarks [--quick] [--only NAME ...] [--skip NAME ...] [--results-dir DIR] [--render-only]``

Scripts are discovered, not listed: every ``benchmarks/bench_*.py``, ``reproduce_*.py`` and ``gpu_*.py``
module, each run as ``python -m benchmarks.<name>`` in its own process, one after another, with
``$ZOO_BENCH_RESULTS`` pointing at the results directory. ``--quick`` runs every script's ``--quick`` pass two
at a time, each in a process forked from one that has already imported torch, zoo, lightning and transformers
(``benchmarks/_quick.py``): a quick pass computes for less time than a fresh process spends importing them. A
failing script is reported (name, exit code, the end of its output) and the suite goes on; the exit code is
non-zero if any failed. ``--quick`` writes to ``benchmarks/.quick/`` (git-ignored) unless ``--results-dir`` says
otherwise, so it never overwrites the committed full results. Every script's wall time and CPU time (user +
system, its subprocesses included: the figure that stays put on a loaded machine) go to ``suite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS_ENV, save, table
from benchmarks._quick import run_quick
from benchmarks._render import default_page, render

HERE = Path(__file__).resolve().parent
PATTERNS = ("bench_*.py", "reproduce_*.py", "gpu_*.py")


def discover() -> list[str]:
    """Module names of the benchmark scripts in ``benchmarks/``, sorted (benchmarks, reproductions, GPU)."""
    return [p.stem for pattern in PATTERNS for p in sorted(HERE.glob(pattern))]


def run_script(name: str, results_dir: Path, log_dir: Path, timeout: float | None) -> int:
    """Run one script in a process of its own, its stdout and stderr streamed to ``log_dir/<name>.log`` (follow
    it with ``tail -f``). Returns its exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    env = {**os.environ, RESULTS_ENV: str(results_dir)}
    cmd = [sys.executable, "-m", f"benchmarks.{name}"]
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, cwd=HERE.parent, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
            f.write(f"\n(timed out after {timeout:.0f} s)\n")
    return code


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def record_run(results_dir: Path, name: str, code: int, seconds: float, quick: bool, cpu: float | None) -> None:
    """Add one script's run (exit code, wall time, CPU seconds) to ``suite.json``, which keeps the latest run of
    every script, so the page says how long each took and what the whole suite costs."""
    path = results_dir / "suite.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[name] = {"exit_code": code, "seconds": seconds, "cpu_seconds": cpu, "quick": quick,
                  "finished": time.strftime("%Y-%m-%d %H:%M")}
    rows = [[n, "ok" if r["exit_code"] == 0 else f"failed ({r['exit_code']})", r["seconds"] / 60,
             r.get("cpu_seconds"), r["quick"], r["finished"]] for n, r in sorted(runs.items())]
    total = sum(r["seconds"] for r in runs.values()) / 60
    cpu = sum(r.get("cpu_seconds") or 0 for r in runs.values())
    reproductions = sum(r["seconds"] for n, r in runs.items() if n.startswith("reproduce_")) / 60
    save("suite", {"runs": runs, "total_minutes": total, "reproduction_minutes": reproductions,
                   "table": table("Latest run of each script",
                                  ["script", "status", "minutes", "CPU seconds", "quick", "finished"], rows),
                   "reading": f"The latest runs took {total:.1f} minutes in all, {reproductions:.1f} of them for the "
                              f"reproductions, and {cpu:.0f} CPU-seconds (a full run: one script after another, "
                              f"each in a fresh process; --quick: two at a time, forked with the imports done)."},
         results_dir)


def report(results_dir: Path, log_dir: Path, name: str, code: int, seconds: float, cpu: float | None,
           quick: bool) -> bool:
    """Record a finished script in ``suite.json`` and print its outcome (the end of its log if it failed);
    returns whether it succeeded."""
    record_run(results_dir, name, code, seconds, quick, cpu)
    cpu_text = f", {cpu:.1f} CPU s" if cpu is not None else ""
    if code == 0:
        print(f"ok ({seconds:.1f} s{cpu_text})", flush=True)
        return True
    log = log_dir / f"{name}.log"
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    tail = "\n".join("    " + line for line in tail.strip().splitlines()[-15:])
    print(f"FAILED, exit code {code} ({seconds:.1f} s{cpu_text}); log {log}\n{tail}", flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="each script's short pass, two at a time (about a minute in all)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="do not run these scripts")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where JSON and PNG go (default: benchmarks/results, or benchmarks/.quick with --quick)")
    parser.add_argument("--render-only", action="store_true", help="only regenerate RESULTS.md from the JSON")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per script")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in (args.only or []) + args.skip if n not in names]
    if unknown:
        parser.error(f"unknown script(s) {', '.join(unknown)}; available: {', '.join(names)}")
    results_dir = (args.results_dir or (HERE / ".quick" if args.quick else HERE / "results")).resolve()
    failed = []
    if not args.render_only:
        selected = [n for n in names if (not args.only or n in args.only) and n not in args.skip]
        log_dir = HERE / ".logs" if results_dir == (HERE / "results").resolve() else results_dir / "logs"
        suite_start, cpu_total = time.perf_counter(), 0.0
        if args.quick:  # reported as they finish, two at a time
            runs = run_quick(selected, results_dir, log_dir, args.timeout)
            for i, (name, code, elapsed, cpu) in enumerate(runs, 1):
                print(f"[{i}/{len(selected)}] {name} --quick ...", end=" ")
                if not report(results_dir, log_dir, name, code, elapsed, cpu, True):
                    failed.append(name)
                cpu_total += cpu or 0.0
        else:
            for i, name in enumerate(selected, 1):
                print(f"[{i}/{len(selected)}] {name} ...", end=" ", flush=True)
                start, cpu_start = time.perf_counter(), cpu_seconds()
                code = run_script(name, results_dir, log_dir, args.timeout)
                cpu = cpu_seconds() - cpu_start
                if not report(results_dir, log_dir, name, code, time.perf_counter() - start, cpu, False):
                    failed.append(name)
                cpu_total += cpu
        print(f"{len(selected) - len(failed)}/{len(selected)} scripts ok in {time.perf_counter() - suite_start:.0f} s, "
              f"{cpu_total:.0f} CPU s")
    page = render(results_dir, default_page(results_dir))
    print(f"wrote {page}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
