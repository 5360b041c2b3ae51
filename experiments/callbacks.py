"""Hydra callback for multiruns: validate every run first, show progress, then gather results.

* before the first job: compose and validate every combination of the sweep, so a bad value in
  run 7 of 8 fails before run 1 starts, naming the key;
* after each job: advance a progress bar (in-process launchers);
* at the end: ``results.csv`` in the sweep directory, a short table on stdout, and
  ``latency_breakdown.png`` beside it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

from experiments.results import collect, format_table, write_csv
from experiments.setup import build_run
from sim.errors import ConfigError

log = logging.getLogger("flashlab")


def sweep_combinations(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of this multirun, as the basic sweeper will expand them."""
    params = OmegaConf.to_container(config.hydra.sweeper.get("params") or {}, resolve=False)
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [combo for batch in BasicSweeper.split_arguments(overrides, None) for combo in batch]


class ResultsTable(Callback):
    def __init__(self) -> None:
        self.bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            combos = sweep_combinations(config)
        except Exception as e:  # an unusual sweeper: leave validation to each job
            log.debug("sweep pre-validation skipped: %s", e)
            return
        for combo in combos:
            try:
                build_run(compose(config_name=config.hydra.job.config_name, overrides=combo))
            except ConfigError as e:
                # Hydra turns a callback's exceptions into warnings; SystemExit stops the sweep for real.
                raise SystemExit(f"invalid run {' '.join(combo)}:\n  {e}\nNo run was started.")
        if config.get("progress", True) and len(combos) > 1:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=len(combos), desc="runs", unit="run")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        sweep_dir = Path(config.hydra.sweep.dir)
        df = collect(sweep_dir)
        if df.empty:
            return
        csv = write_csv(df, sweep_dir / "results.csv")
        print(format_table(df))
        try:
            from experiments.plots import latency_breakdown
            png = latency_breakdown(df, sweep_dir / "latency_breakdown.png")
            print(f"results: {csv}\nfigure:  {png}")
        except Exception as e:  # a figure must never lose the table
            log.warning("could not draw the figure: %s", e)
            print(f"results: {csv}")
