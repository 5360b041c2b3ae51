"""Launchers: a multirun on a local Ray instance writes the same results.csv as with joblib."""

import pandas as pd
import pytest

from experiments.sweep import run_multirun

SWEEP = ["model=opt-small", "policy.predictor_rank=32", "policy.memory_budget=0.8", "tokens=8", "warmup=2",
         "policy=naive,windowing,windowing_bundling", "policy.window=1,3"]
VOLATILE = ["wall_s", "run_dir"]


def table(path):
    df = pd.read_csv(path).drop(columns=VOLATILE)
    return df.sort_values(["policy", "window"]).reset_index(drop=True)


def test_ray_multirun_writes_the_same_results_as_joblib(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    run_multirun(SWEEP, tmp_path / "joblib", launcher="joblib")
    try:
        run_multirun([*SWEEP, "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"],
                     tmp_path / "ray", launcher="ray")
    finally:
        ray.shutdown()
    a, b = table(tmp_path / "joblib" / "results.csv"), table(tmp_path / "ray" / "results.csv")
    assert len(a) == 6
    pd.testing.assert_frame_equal(a, b)
    assert sorted(p.parent.name for p in (tmp_path / "ray").glob("*/result.json")) == [str(i) for i in range(6)]
