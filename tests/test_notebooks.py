"""The analysis notebooks (jupytext percent .py files) run top to bottom on small results, so they
cannot rot. With jupytext + nbclient (the `notebooks` extra) they run as notebooks in a kernel;
without them, as plain scripts."""

import os
import runpy
from pathlib import Path

import pandas as pd
import pytest

from experiments.calibrate_sim import Evaluator, apply_params, load_points
from experiments.sweep import run_multirun
from sim.hardware import HardwareProfile

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    """A small sim sweep, and a backend=both-shaped table whose "measured" half is the prediction
    of a perturbed profile (no torch or flash needed)."""
    root = tmp_path_factory.mktemp("nb")
    common = ["model=opt-small", "hardware=h100-vda", "policy.predictor_rank=32", "policy.memory_budget=0.8",
              "tokens=8", "warmup=2"]
    sim = run_multirun([*common, "+study=paper_window", "policy=windowing,windowing_bundling", "policy.window=0,2,4"],
                       root / "window", launcher="basic")
    both = root / "both"
    df = run_multirun([*common, "policy=windowing,windowing_bundling", "policy.window=1,4", "policy.chunk_kib=16,64"],
                      both, launcher="basic")
    real = df.assign(backend="real")
    real.to_csv(both / "results.csv", index=False)
    hidden = apply_params(HardwareProfile.preset("h100-vda"), ["read_scale", "op_overhead_us"], [0.5, 30.0], True)
    real["latency_ms"] = Evaluator(load_points([both]))(hidden)
    err = (df["latency_ms"] - real["latency_ms"]) / real["latency_ms"] * 100
    pd.concat([df.assign(error_pct=err), real.assign(error_pct=err)]).to_csv(both / "results.csv", index=False)
    return {"paper_figures": str(root / "window"), "sim_vs_real": str(both)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, small_results, monkeypatch):
    monkeypatch.setenv("FLASHLAB_RESULTS", small_results[path.stem])
    monkeypatch.setenv("FLASHLAB_MAX_EVALS", "60")
    monkeypatch.chdir(ROOT)
    try:
        import jupytext
        from nbclient import NotebookClient
    except ImportError:
        runpy.run_path(str(path), run_name="__main__")
        return
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)   # the figures were drawn
