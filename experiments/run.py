"""``python -m experiments.run``: one run (or, with -m, a sweep) of model x hardware x policy x trace.

The plan is made once by the shared policy engine; the simulator times it (backend=sim), the real
engine executes it (backend=real), or both do, and the rows carry the prediction error.

Runs are resumable: a run directory whose result.json was written for the same resolved config
(``config_hash``) is not run again, so re-launching a killed sweep into the same
``hydra.sweep.dir`` only does the runs that had not finished."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import experiments.schema  # noqa: F401  (registers dataclass defaults with Hydra)
from experiments.results import (add_error_pct, config_hash, finished_rows, format_table, frame, make_row,
                                 write_result)
from experiments.setup import RunSetup, build_run
from sim.plan import PolicyEngine
from sim.simulator import simulate
from sim.timeline import save_timeline

log = logging.getLogger("flashlab")


def run_sim(setup: RunSetup, trace, plans, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    bar = tqdm(total=setup.tokens, desc="sim tokens", leave=False, disable=not setup.progress)
    result = simulate(setup.spec, setup.hardware, setup.policy, plans=plans, record_timeline=setup.timeline,
                      granularity=setup.backend.get("granularity", "batch"), progress=bar)
    bar.close()
    if setup.timeline:
        save_timeline(result.timeline, run_dir, title=f"{setup.spec.name} / {setup.policy.name} / {setup.hardware.name}")
    summary = result.summary(setup.warmup)
    return make_row(setup, "sim", summary, float(trace.sparsity().mean()),
                    wall_s=round(time.perf_counter() - t0, 3))


def run_real(setup: RunSetup, trace, plans, run_dir: Path) -> dict:
    try:
        from real.backend import measure  # torch lives only on this side
    except ImportError as e:
        raise SystemExit(f"backend=real needs the real backend and its extra: pip install -e '.[real]' ({e})")
    t0 = time.perf_counter()
    summary = measure(setup, trace, plans, run_dir)
    return make_row(setup, "real", summary, float(trace.sparsity().mean()),
                    wall_s=round(time.perf_counter() - t0, 3))


def execute(setup: RunSetup, run_dir: Path, hash_: str = "") -> list[dict]:
    """Plan once, then time/execute the plan on the chosen backend(s); write result.json."""
    trace = setup.make_trace()
    engine = PolicyEngine(setup.spec, setup.policy)
    plans = list(engine.plan_trace(trace))
    backend = setup.backend["name"]
    rows = []
    if backend in ("sim", "both"):
        rows.append(run_sim(setup, trace, plans, run_dir))
    if backend in ("real", "both"):
        rows.append(run_real(setup, trace, plans, run_dir))
    if backend == "both":
        add_error_pct(predicted=rows[0], measured=rows[1])
    for r in rows:
        r["cache_neurons"] = engine.capacity
        r["config_hash"] = hash_
        r["run_dir"] = str(run_dir)
    write_result(run_dir, rows)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    hash_ = config_hash(OmegaConf.to_container(cfg, resolve=True))
    rows = finished_rows(run_dir, hash_)
    if rows is not None:
        log.info("skipped: %s already holds this run (config_hash %s)", run_dir / "result.json", hash_)
    else:
        setup = build_run(cfg)  # validates everything before any work
        # token bars only where they have a terminal of their own: not from parallel workers
        setup.progress = setup.progress and (hc.mode.name == "RUN" or "BasicLauncher" in str(hc.launcher.get("_target_")))
        rows = execute(setup, run_dir, hash_)
    if hc.mode.name == "RUN":
        print(format_table(frame(rows)))
        print(f"result: {run_dir / 'result.json'}")


if __name__ == "__main__":
    main()
