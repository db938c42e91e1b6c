"""Render every results JSON of a directory into one Markdown page (``benchmarks/RESULTS.md``).

Generic over the payload convention documented in ``benchmarks/_common.py``: a machine header, then one
section per JSON with its machine, its ``table``/``tables`` (``summary()`` cells as ``median (min-max)``),
links to its ``plots`` and its ``reading``. Payloads without a table (older scripts) get a short note.
Run directly: ``python -m benchmarks._render [--results-dir DIR] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from benchmarks._common import RESULTS

# The headline claims the suite reproduces: script/JSON name -> what it reproduces. Listed at the top of the
# page with their status, so a reproduction that did not run says so instead of silently missing.
REPRODUCTIONS = {
    "reproduce_switch_vs_dense": "Switch MoE vs dense at equal active parameters (Fedus et al. 2021)",
    "reproduce_balancing": "Loss-free balancing vs auxiliary loss (Wang et al. 2024, arXiv 2408.15664)",
    "reproduce_retnet_vs_transformer": "RetNet vs Transformer at equal parameters (Sun et al. 2023)",
    "bench_speculative": "MTP on vs off, self-speculative decoding (Gloeckle et al. 2024; DeepSeek-V3)",
    "reproduce_scaling": "Predictable scaling L(N) = E + A / N^alpha (Kaplan et al. 2020; Hoffmann et al. 2022)",
    "reproduce_lora": "LoRA and QLoRA near full fine-tuning with under 1% trained (Hu et al. 2021; Dettmers et al. 2023)",
}


def format_number(x) -> str:
    """A table cell: thousands separators for large numbers, 3-4 significant digits otherwise, "—" for None."""
    if x is None:
        return "—"
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return "n/a"
        a = abs(x)
        if a >= 100:
            return f"{x:,.0f}"
        if a >= 10:
            return f"{x:.1f}"
        if a >= 1:
            return f"{x:.3f}"
        if a >= 0.01 or a == 0:
            return f"{x:.3f}"
        return f"{x:.2e}"
    return str(x)


def format_cell(cell) -> str:
    """A table cell: a ``summary()`` dict as ``median (min–max)``, a seed band (``mean``/``min``/``max``, see
    ``benchmarks/_train.py``) as ``mean (min–max)``, anything else as :func:`format_number`."""
    centre = next((key for key in ("median", "mean") if isinstance(cell, dict) and key in cell), None)
    if centre:
        spread = f" ({format_number(cell['min'])}–{format_number(cell['max'])})" if "min" in cell else ""
        return format_number(cell[centre]) + spread
    return format_number(cell).replace("|", "\\|")


def markdown_table(table: dict) -> str:
    lines = [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    cores = f" ({m['cores']} cores)" if m.get("cores") else ""
    return (f"{m.get('cpu') or 'unknown CPU'}{cores}; torch {m.get('torch')} with {m.get('threads')} thread(s); "
            f"Python {m.get('python', '?')}; GPU: {m.get('gpu') or 'none'}")


def load_results(results_dir: Path) -> list[dict]:
    """Every ``*.json`` payload in ``results_dir`` (sorted by name) that names its benchmark."""
    out = []
    for path in sorted(results_dir.glob("*.json")):
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and "benchmark" in payload:
            out.append(payload)
    return out


def section(payload: dict, results_dir: Path, out_dir: Path) -> str:
    name = payload["benchmark"]
    parts = [f'<a id="{name}"></a>', "", f"## {name}" + (" (quick pass)" if payload.get("quick") else ""), ""]
    parts += [f"Machine: {machine_line(payload.get('machine', {}))}.", ""]
    tables = ([payload["table"]] if "table" in payload else []) + list(payload.get("tables", []))
    for table in tables:
        parts += [markdown_table(table), ""]
    if not tables:
        parts += ["(This result has no `table` entry: it predates the table convention of `benchmarks/_common.py`;"
                  f" see `{name}.json` for the figures.)", ""]
    for plot in payload.get("plots", []):
        link = os.path.relpath(results_dir / plot, out_dir)
        parts += [f"![{name}]({link})", ""]
    if payload.get("reading"):
        parts += [payload["reading"], ""]
    return "\n".join(parts)


def render(results_dir: Path = RESULTS, out: Path | None = None) -> Path:
    """Write the Markdown page for the JSONs in ``results_dir`` to ``out`` (default ``results_dir/../RESULTS.md``
    for the committed results, ``results_dir/RESULTS.md`` for any other directory); returns its path."""
    results_dir = Path(results_dir).resolve()
    out = Path(out) if out else default_page(results_dir)
    payloads = load_results(results_dir)
    machines = []
    for p in payloads:
        line = machine_line(p.get("machine", {}))
        if line not in machines:
            machines.append(line)
    by_name = {p["benchmark"]: p for p in payloads}
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks` (`--render-only` rewrites this page from the JSON files). "
             "Each table is the medians of repeats alternated in one run, with min–max in parentheses; ratios "
             "are against the peer measured in the same run. Machine(s):", ""]
    lines += [f"- {m}" for m in machines] or ["- (no results yet)"]
    lines += ["", "## Reproductions of headline claims", "",
              "Verdicts come from the seed bands (mean with the min–max range over seeds): a claim is *reproduced* "
              "only when the difference it predicts exceeds the spread, *not reproduced* when the bands show the "
              "opposite, *inconclusive* when they overlap.", "",
              "| claim | verdict | reason | result |", "|---|---|---|---|"]
    for key, claim in REPRODUCTIONS.items():
        found = by_name.get(key) or by_name.get(f"{key}_quick")
        link = f"[{found['benchmark']}](#{found['benchmark']})" if found else "not run"
        if found and found.get("quick"):
            link += " (quick pass only)"
        judged = (found or {}).get("verdict") or {"status": "—", "reason": "no verdict in this result"}
        lines.append(f"| {claim} | {judged['status']} | {format_cell(judged['reason'])} | {link} |")
    lines.append("")
    for payload in payloads:
        lines.append(section(payload, results_dir, out.parent.resolve()))
    figures = [(p["benchmark"], plot) for p in payloads for plot in p.get("plots", [])]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{plot}]({os.path.relpath(results_dir / plot, out.parent.resolve())}) ([{name}](#{name}))"
                  for name, plot in figures]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


def default_page(results_dir: Path) -> Path:
    """``benchmarks/RESULTS.md`` for the committed results directory, ``<dir>/RESULTS.md`` for any other."""
    committed = (Path(__file__).resolve().parent / "results").resolve()
    return committed.parent / "RESULTS.md" if Path(results_dir).resolve() == committed else Path(results_dir) / "RESULTS.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print(f"wrote {render(args.results_dir, args.out)}")


if __name__ == "__main__":
    main()
