"""Run a Hydra multirun of ``experiments.run`` from Python, in this process.

Same app, same config, same callbacks as ``python -m experiments.run -m ...``, but without a new
interpreter per sweep (figures --paper, tests and benchmarks call it several times). Returns the
sweep's results table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
from hydra.core.global_hydra import GlobalHydra

from experiments.results import collect
from sim.presets import CONF_DIR


class SweepFailed(RuntimeError):
    pass


def run_multirun(overrides: Sequence[str], sweep_dir: str | Path, *, launcher: str | None = None,
                 progress: bool = False) -> pd.DataFrame:
    """``python -m experiments.run -m OVERRIDES hydra.sweep.dir=SWEEP_DIR`` in-process.

    ``launcher`` picks hydra/launcher (joblib, basic, ray); None keeps conf/config.yaml's."""
    from experiments.run import main

    sweep_dir = Path(sweep_dir).resolve()
    args = ["-m", *overrides, f"hydra.sweep.dir={sweep_dir}", f"progress={str(progress).lower()}"]
    if launcher:
        args.append(f"hydra/launcher={launcher}")
    saved = sys.argv
    # imported (not run as __main__), the app would look for a "conf" package: name the directory
    sys.argv = ["experiments.run", f"--config-path={CONF_DIR}", *args]
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as e:  # Hydra reports errors by exiting
        if e.code not in (0, None):
            raise SweepFailed(f"sweep {' '.join(overrides)} into {sweep_dir} failed (exit {e.code}); "
                              f"see the message above") from e
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return collect(sweep_dir)
