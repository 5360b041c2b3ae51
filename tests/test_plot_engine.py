"""benchmarks/plot_engine.py draws any bench_engine results file and names a bad one."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import plot_engine  # noqa: E402


def test_plots_a_results_file(tmp_path):
    recs = [{"policy": "naive", "latency_ms": 4000.0, "repeat": r, "model": "m", "device": "d", "date": "x"}
            for r in range(2)]
    recs += [{"policy": "wb", "latency_ms": 200.0 + r, "io_lower_bound_ms": 170.0, "speedup_vs_naive": 20.0 - r,
              "repeat": r} for r in range(2)]
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(recs))
    out = tmp_path / "e.png"
    assert plot_engine.main([str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_a_file_that_is_not_results_is_named(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([{"rule": "lfu"}]))
    with pytest.raises(SystemExit, match="x.json.*Fix"):
        plot_engine.main([str(bad)])
