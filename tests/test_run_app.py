"""The Hydra app end to end: a single run writes result.json; a multirun writes results.csv."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from experiments.results import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def run_app(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "experiments.run", *args, "progress=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_single_run_writes_result_json(tmp_path):
    run_app("tokens=12", "warmup=2", "timeline=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    rows = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(rows) == 1 and set(COLUMNS) <= set(rows[0])
    assert rows[0]["backend"] == "sim" and rows[0]["latency_ms"] > 0
    assert rows[0]["lookahead"] == 0 and rows[0]["coalesce_gap"] == 0    # the policy's look-ahead switches, recorded
    assert (tmp_path / "run" / "timeline.png").exists() and (tmp_path / "run" / "timeline.csv").exists()


def test_multirun_writes_results_csv_with_fixed_columns(tmp_path):
    out = run_app("-m", "model=opt-6.7b", "hardware=m1-max", "policy=naive,windowing_bundling", "tokens=12",
                  "warmup=2", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    df = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert sorted(df["policy"]) == ["naive", "windowing_bundling"]
    assert (tmp_path / "sweep" / "latency_breakdown.png").exists()
    assert "vs_naive" in out.stdout
    naive = df.set_index("policy").loc["naive", "latency_ms"]
    best = df.set_index("policy").loc["windowing_bundling", "latency_ms"]
    assert naive > best


def test_backend_both_runs_lookahead_plans_pipelined(tmp_path):
    """policy.lookahead=1 on backend=both: the real backend executes the look-ahead plans (early reads one layer
    ahead) beside the simulator's timing of the same plans, and both rows record the switch."""
    run_app("model=opt-tiny", "backend=both", "policy.lookahead=1", "trace=opt-6.7b-paper-lookahead", "tokens=6",
            "warmup=2", f"backend.cache_dir={tmp_path}/flash", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    rows = json.loads((tmp_path / "run" / "result.json").read_text())
    assert sorted(r["backend"] for r in rows) == ["real", "sim"]
    assert all(r["lookahead"] == 1 and r["latency_ms"] > 0 and r["error_pct"] is not None for r in rows)
