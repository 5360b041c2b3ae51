"""Experiments: resumable multiruns, the joblib launcher, experiment configs, the figures CLI."""

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import experiments.run as run_app
from experiments.callbacks import sweep_combinations
from experiments.figures import main as figures_main
from experiments.results import config_hash
from experiments.setup import build_run
from experiments.sweep import run_multirun
from sim.errors import ConfigError
from sim.presets import CONF_DIR, preset_names

# opt-small: every policy is valid at budget 0.8 with a rank-32 predictor; runs take milliseconds
SMALL = ["model=opt-small", "policy.predictor_rank=32", "policy.memory_budget=0.8", "tokens=8", "warmup=2"]
VOLATILE = ["wall_s", "run_dir"]


def compose_cfg(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def mtimes(sweep: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/result.json")}


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    key = ["policy", "window", "chunk_kib", "backend"]
    a = a.drop(columns=VOLATILE).sort_values(key).reset_index(drop=True)
    b = b.drop(columns=VOLATILE).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


# ---- resumable multiruns --------------------------------------------------------------------
def test_config_hash_ignores_display_keys_only():
    cfg = {"model": {"name": "opt-small"}, "tokens": 8, "progress": True, "timeline": False}
    assert config_hash(cfg) == config_hash({**cfg, "progress": False, "timeline": True})
    assert config_hash(cfg) != config_hash({**cfg, "tokens": 9})
    assert config_hash(cfg) != config_hash({**cfg, "model": {"name": "opt-tiny"}})


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    """Kill simulation: the 4th of 6 runs is interrupted (Ctrl-C) after 3 finished; the rerun into
    the same sweep dir executes exactly the 3 missing runs and leaves the finished ones untouched."""
    sweep = tmp_path / "sweep"
    overrides = [*SMALL, "policy=windowing,windowing_bundling", "policy.window=1,2,4"]
    real_execute, calls = run_app.execute, []

    def dying_execute(setup, run_dir, hash_=""):
        calls.append(Path(run_dir).name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what a kill does to a sweep: no exception handler runs the rest
        return real_execute(setup, run_dir, hash_)

    monkeypatch.setattr(run_app, "execute", dying_execute)
    with pytest.raises(KeyboardInterrupt):
        run_multirun(overrides, sweep, launcher="basic")
    finished = mtimes(sweep)
    assert sorted(finished) == ["0", "1", "2"] and not (sweep / "results.csv").exists()

    calls.clear()
    df = run_multirun(overrides, sweep, launcher="basic")
    assert sorted(calls) == ["3", "4", "5"]              # only the runs that had not finished
    assert {k: v for k, v in mtimes(sweep).items() if k in finished} == finished
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == len(df) == 6 and table["config_hash"].notna().all()
    assert table["config_hash"].nunique() == 6

    calls.clear()
    run_multirun(overrides, sweep, launcher="basic")     # a finished sweep reruns nothing
    assert calls == []


def test_joblib_sweep_resumes_and_reruns_changed_configs(tmp_path):
    """Default launcher (joblib, worker processes): delete two results, rerun: only those two are
    recomputed; a changed config in the same dir is recomputed, not reused."""
    sweep = tmp_path / "sweep"
    overrides = [*SMALL, "policy=predictor,windowing,windowing_bundling", "policy.chunk_kib=16,64"]
    first = run_multirun(overrides, sweep)
    assert len(first) == 6
    assert (sweep / "results.csv").exists() and (sweep / "latency_breakdown.png").exists()
    before = mtimes(sweep)
    for k in ("1", "4"):
        (sweep / k / "result.json").unlink()
    second = run_multirun(overrides, sweep)
    after = mtimes(sweep)
    assert {k: after[k] for k in before if k not in ("1", "4")} == {k: before[k] for k in before if k not in ("1", "4")}
    assert set(after) == set(before)
    same_rows(first, second)

    changed = run_multirun([o if o != "tokens=8" else "tokens=9" for o in overrides], sweep)
    assert all(after[k] != t for k, t in mtimes(sweep).items())
    assert (changed["tokens"] == 9).all()


def test_single_run_into_same_dir_is_skipped(tmp_path, monkeypatch, capsys):
    import sys
    from hydra.core.global_hydra import GlobalHydra
    run_dir = tmp_path / "run"
    argv = ["experiments.run", f"--config-path={CONF_DIR}", *SMALL, f"hydra.run.dir={run_dir}", "progress=false"]
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", argv)
        GlobalHydra.instance().clear()
        run_app.main()
    GlobalHydra.instance().clear()
    rows = json.loads((run_dir / "result.json").read_text())
    assert rows[0]["config_hash"] and (run_dir / ".hydra" / "config.yaml").exists()
    assert "skipped" in (run_dir / "run.log").read_text()


# ---- experiment configs ---------------------------------------------------------------------
SWEEPS = {"paper_cpu": 4, "paper_breakdown": 20, "paper_window": 22, "paper_memory": 14, "validation": 32}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_every_sweep_experiment_composes_and_validates(name):
    cfg = compose_cfg(f"+experiment={name}", hydra=True)
    combos = sweep_combinations(cfg)
    assert len(combos) == SWEEPS[name]
    for combo in combos[:: max(1, len(combos) // 4)]:       # a spread of them through build_run
        setup = build_run(compose_cfg(*combo))
        assert setup.study == name


def test_experiment_list_is_complete():
    assert set(preset_names("experiment")) == set(SWEEPS) | {"paper_flash"}


def test_validation_sweep_covers_the_five_knobs_and_takes_overrides():
    cfg = compose_cfg("+experiment=validation", "model=opt-small", "hardware=m1-max", hydra=True)
    assert cfg.backend.name == "both" and cfg.model.name == "opt-small" and cfg.hardware.name == "m1-max"
    assert set(cfg.hydra.sweeper.params) == {"policy", "policy.chunk_kib", "policy.window", "trace.sparsity",
                                             "policy.memory_budget"}
    assert cfg.hydra.launcher.n_jobs == 1                    # timings: one run at a time


def test_figure_experiment_is_not_a_run():
    with pytest.raises(ConfigError, match="experiments.figures --experiment paper_flash"):
        build_run(compose_cfg("+experiment=paper_flash"))


# ---- figures ----------------------------------------------------------------------------------
def test_figures_cli_from_results_tables(tmp_path):
    a = tmp_path / "window"
    run_multirun([*SMALL, "+study=paper_window", "policy=windowing,windowing_bundling", "policy.window=0,2,4"], a,
                 launcher="basic")
    b = tmp_path / "budget"
    run_multirun([*SMALL, "+study=paper_memory", "policy=naive,windowing_bundling", "policy.memory_budget=0.8,1.0"],
                 b, launcher="basic")
    out = tmp_path / "figs"
    assert figures_main([str(a / "results.csv"), str(b), "--out", str(out)]) == 0
    for name in ("paper_window", "paper_memory", "flash_throughput"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0


def test_figure_axes_are_labelled_with_units(tmp_path):
    from experiments import plots
    from sim.hardware import HardwareProfile
    df = run_multirun([*SMALL, "policy=naive,windowing_bundling", "policy.window=1,3"], tmp_path / "s", launcher="basic")
    figs = [plots.breakdown_by_model(df), plots.window_tradeoff(df), plots.memory_budget_latency(df),
            plots.flash_throughput([HardwareProfile.preset("m1-max")])]
    pairs = df.assign(measured_ms=df["latency_ms"], predicted_ms=df["latency_ms"] * 1.05, error_pct=5.0)
    figs.append(plots.predicted_vs_measured(pairs))
    for fig in figs:
        for ax in fig.axes:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                if label and ax.get_ylabel() != "runs":
                    assert "(" in label and ")" in label, label   # a unit in parentheses
        plots._plt().close(fig)


def test_figures_cli_rejects_missing_input(tmp_path, capsys):
    assert figures_main([str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) == 2
    assert "RESULTS" in capsys.readouterr().err


def test_backend_both_rows_give_predicted_vs_measured_figure(tmp_path):
    pytest.importorskip("torch")
    sweep = tmp_path / "both"
    df = run_multirun([*SMALL, "backend=both", "policy=windowing_bundling", "policy.window=1,4", f"backend.cache_dir={tmp_path / 'flash'}"],
                      sweep, launcher="basic")
    assert sorted(df["backend"]) == ["real", "real", "sim", "sim"] and df["error_pct"].notna().all()
    out = tmp_path / "figs"
    assert figures_main([str(sweep), "--out", str(out)]) == 0
    assert (out / "runs_predicted_vs_measured.png").exists() and (out / "runs_predicted_vs_measured.pdf").exists()


def test_collect_writes_results_of_an_unfinished_sweep(tmp_path):
    from experiments.collect import main as collect_main
    sweep = tmp_path / "s"
    run_multirun([*SMALL, "policy=naive,windowing_bundling"], sweep, launcher="basic")
    (sweep / "results.csv").unlink()
    (sweep / "0" / "result.json").unlink()                  # as if run 0 never finished
    assert collect_main([str(sweep)]) == 0
    assert list(pd.read_csv(sweep / "results.csv")["policy"]) == ["windowing_bundling"]
    assert collect_main([str(tmp_path / "empty")]) == 1
