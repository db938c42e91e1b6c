"""Run every benchmark script, then regenerate ``RESULTS.md`` from the results JSON.

``python -m benchmarks [--quick] [--only NAME ...] [--skip NAME ...] [--results-dir DIR] [--render-only]``

Scripts are discovered, not listed: every ``benchmarks/bench_*.py``, ``reproduce_*.py`` and ``gpu_*.py``
module, each run as ``python -m benchmarks.<name> [--quick]`` in its own process with ``$ZOO_BENCH_RESULTS``
pointing at the results directory. A failing script is reported (name, exit code, the end of its output) and
the suite goes on; the exit code is non-zero if any failed. ``--quick`` writes to ``benchmarks/.quick/``
(git-ignored) unless ``--results-dir`` says otherwise, so it never overwrites the committed full results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS_ENV, save, table
from benchmarks._render import default_page, render

HERE = Path(__file__).resolve().parent
PATTERNS = ("bench_*.py", "reproduce_*.py", "gpu_*.py")


def discover() -> list[str]:
    """Module names of the benchmark scripts in ``benchmarks/``, sorted (benchmarks, reproductions, GPU)."""
    return [p.stem for pattern in PATTERNS for p in sorted(HERE.glob(pattern))]


def run_script(name: str, quick: bool, results_dir: Path, log_dir: Path, timeout: float | None) -> tuple[int, str]:
    """Run one script, its stdout and stderr streamed to ``log_dir/<name>.log`` (follow it with ``tail -f``).
    Returns (exit code, the end of that log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    env = {**os.environ, RESULTS_ENV: str(results_dir)}
    cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, cwd=HERE.parent, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
            f.write(f"\n(timed out after {timeout:.0f} s)\n")
    return code, log.read_text(errors="replace")[-3000:]


def record_run(results_dir: Path, name: str, code: int, seconds: float, quick: bool) -> None:
    """Add one script's run (exit code, wall time) to ``suite.json``, which keeps the latest run of every script,
    so the page says how long each took and what the whole suite costs."""
    path = results_dir / "suite.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[name] = {"exit_code": code, "seconds": seconds, "quick": quick, "finished": time.strftime("%Y-%m-%d %H:%M")}
    rows = [[n, "ok" if r["exit_code"] == 0 else f"failed ({r['exit_code']})", r["seconds"] / 60, r["quick"],
             r["finished"]] for n, r in sorted(runs.items())]
    total = sum(r["seconds"] for r in runs.values()) / 60
    reproductions = sum(r["seconds"] for n, r in runs.items() if n.startswith("reproduce_")) / 60
    save("suite", {"runs": runs, "total_minutes": total, "reproduction_minutes": reproductions,
                   "table": table("Latest run of each script", ["script", "status", "minutes", "quick", "finished"],
                                  rows),
                   "reading": f"The latest runs took {total:.1f} minutes in all, {reproductions:.1f} of them for the "
                              f"reproductions (each script in its own process, one after another)."},
         results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's short pass (a few minutes in all)")
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
        suite_start = time.perf_counter()
        for i, name in enumerate(selected, 1):
            print(f"[{i}/{len(selected)}] {name}{' --quick' if args.quick else ''} ...", end=" ", flush=True)
            start = time.perf_counter()
            code, log_tail = run_script(name, args.quick, results_dir, log_dir, args.timeout)
            elapsed = time.perf_counter() - start
            record_run(results_dir, name, code, elapsed, args.quick)
            if code == 0:
                print(f"ok ({elapsed:.1f} s)", flush=True)
            else:
                failed.append(name)
                tail = "\n".join("    " + line for line in log_tail.strip().splitlines()[-15:])
                print(f"FAILED, exit code {code} ({elapsed:.1f} s); log {log_dir / (name + '.log')}\n{tail}",
                      flush=True)
        print(f"{len(selected) - len(failed)}/{len(selected)} scripts ok in {time.perf_counter() - suite_start:.0f} s")
    page = render(results_dir, default_page(results_dir))
    print(f"wrote {page}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
