"""The benchmark suite does not rot: ``python -m benchmarks --quick`` on cheap scripts writes well-formed JSON
and a RESULTS.md with a section per JSON; the reproductions' helpers compute what they claim."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import table
from benchmarks._render import render
from benchmarks._train import VERDICTS, band, curve_band, order, steps_to_reach, value_at, verdict
from benchmarks.reproduce_scaling import batch_and_steps, fit_power_law, predict
from benchmarks.reproduce_switch_vs_dense import crossing
from benchmarks.run_all import discover

ROOT = Path(__file__).resolve().parent.parent


def check_payload(payload: dict) -> None:
    assert isinstance(payload["benchmark"], str)
    assert {"cpu", "cores", "threads", "torch", "gpu"} <= set(payload["machine"])
    for t in [payload["table"], *payload.get("tables", [])]:
        assert t["title"] and t["columns"] and t["rows"]
        assert all(len(row) == len(t["columns"]) for row in t["rows"]), t["title"]
        for row in t["rows"]:
            for cell in row:  # a summary() of repeats or a seed band
                if isinstance(cell, dict):
                    centre = "median" if "median" in cell else "mean"
                    assert {centre, "min", "max"} <= set(cell), t["title"]
                    assert cell["min"] <= cell[centre] <= cell["max"], t["title"]
    if "verdict" in payload:
        assert payload["verdict"]["status"] in VERDICTS and payload["verdict"]["reason"]


def test_quick_suite_schema(tmp_path):
    """Every script's --quick pass (all in one process: about 100 CPU-seconds, a minute on 2 idle cores), then the
    page over their JSON. The timeout only catches a hang: a loaded or slow machine may take many times as long."""
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--results-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=3 * 3600)
    assert out.returncode == 0, out.stdout + out.stderr
    payloads = {p["benchmark"]: p for p in (json.loads(path.read_text()) for path in sorted(tmp_path.glob("*.json")))}
    suite = payloads.pop("suite")
    assert set(suite["runs"]) == set(discover()) and all(r["exit_code"] == 0 for r in suite["runs"].values())
    assert all(r["quick"] and r["cpu_seconds"] >= 0 for r in suite["runs"].values())
    assert {"gpu_suite", "moe", "reproduce_switch_vs_dense_quick", "bench_speculative_quick"} <= set(payloads)
    page = (tmp_path / "RESULTS.md").read_text()
    for payload in [*payloads.values(), suite]:
        check_payload(payload)
        assert f"## {payload['benchmark']}" in page
        for plot in payload.get("plots", []):
            assert (tmp_path / plot).is_file()
    switch = payloads["reproduce_switch_vs_dense_quick"]
    assert switch["quick"] and switch["reading"] and len(switch["results"]["64"]["dense"]["val_loss_curve"]["steps"]) >= 2
    for name in ("reproduce_switch_vs_dense", "reproduce_balancing", "reproduce_scaling",
                 "reproduce_retnet_vs_transformer", "bench_speculative"):
        assert payloads[f"{name}_quick"]["verdict"]["status"] in VERDICTS, name
    assert "| not run |" not in page and "(quick pass only)" in page  # every reproduction ran, in its quick form


def test_committed_results_follow_the_convention():
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):  # every machine's directory
        check_payload(json.loads(path.read_text()))


def test_discovery_finds_every_script():
    names = discover()
    assert {"bench_moe", "reproduce_balancing", "reproduce_scaling", "gpu_suite"} <= set(names)
    assert not any(n.startswith("_") for n in names)


def test_render_tolerates_payloads_without_table(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"benchmark": "old", "machine": {"cpu": "x"}, "value": 1}))
    (tmp_path / "new.json").write_text(json.dumps({
        "benchmark": "new", "machine": {"cpu": "x", "threads": 2, "torch": "2"}, "reading": "it went fine",
        "table": table("t", ["a", "b"], [["zoo", {"median": 2.0, "min": 1.0, "max": 3.0}]])}))
    page = render(tmp_path).read_text()
    assert "## old" in page and "no `table` entry" in page
    assert "| zoo | 2.000 (1.000–3.000) |" in page and "it went fine" in page


def test_table_checks_row_width():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        table("t", ["a", "b", "c"], [[1, 2]])


def test_power_law_fit_recovers_known_curve():
    ns = [1e5, 3e5, 1e6, 3e6]
    fit = fit_power_law(ns, [1.5 + 40.0 * n ** -0.35 for n in ns])
    assert fit["alpha"] == pytest.approx(0.35, abs=0.006)
    assert predict(fit, 1e7) == pytest.approx(1.5 + 40.0 * 1e7 ** -0.35, rel=1e-3)


def test_seed_bands_and_verdicts():
    a, b = band([1.0, 2.0, 3.0]), band([3.5, 4.0, 5.0])
    assert (a["mean"], a["min"], a["max"]) == (2.0, 1.0, 3.0)
    assert order(a, b) == "below" and order(b, a) == "above" and order(a, band([2.9, 4.0])) == "overlap"
    curves = curve_band([[(1, 1.0), (2, 2.0)], [(1, 3.0), (2, 4.0), (3, 9.0)]])
    assert curves == {"steps": [1, 2], "mean": [2.0, 3.0], "min": [1.0, 2.0], "max": [3.0, 4.0]}
    assert value_at([(0, 1.0), (10, 2.0)], 5) == pytest.approx(1.5) and value_at([(0, 1.0), (10, 2.0)], 20) == 2.0
    with pytest.raises(ValueError, match="allowed"):
        verdict("probably", "a reason")


def test_steps_to_reach_interpolates():
    curve = [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert steps_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 3.5) == 10.0
    assert steps_to_reach(curve, 1.0) is None


def test_scaling_batch_keeps_the_token_budget_and_the_steps():
    for n in (13_456, 27_864, 50_464, 111_024, 184_896):  # d_model 16-64 at 32 tokens per parameter
        rows, steps = batch_and_steps(32 * n, 128, 500)
        assert abs(steps - 500) <= 500 / rows / 2 + 1 and steps * rows * 128 == pytest.approx(32 * n, rel=0.04)
    assert batch_and_steps(10, 32, 2) == (1, 1)  # fewer tokens than one row: one step, never zero


def test_switch_crossing_is_measured_or_extrapolated():
    def results(gaps):
        return {w: {"dense": {"val_loss": {"mean": 2.0}},
                    "switch every other FFN": {"loss_at_dense_compute": {"mean": 2.0 + g}}} for w, g in gaps.items()}

    assert "near d_model 91" in crossing(results({64: 0.02, 128: -0.02}))  # sign change: log-linear root
    shrinking = crossing(results({64: 0.04, 128: 0.02}))
    assert "no crossing is measured" in shrinking and "close near d_model 256" in shrinking
    assert "close near" not in crossing(results({64: 0.02, 128: 0.04}))  # a growing gap is not extrapolated
