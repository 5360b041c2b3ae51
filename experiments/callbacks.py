"""Hydra callback for multiruns: validate every run first, show progress, then gather results.

* before the first job: compose and validate every combination of the sweep, so a bad value in
  run 7 of 8 fails before run 1 starts, naming the key;
* while the jobs run: a progress bar that counts the ``result.json`` files appearing in the sweep
  directory, polled from a thread of the launching process -- so it works whatever process runs
  the jobs (basic launcher in-process, joblib workers, Ray nodes sharing the filesystem); runs
  skipped on a resumed sweep count from the start;
* at the end: ``results.csv`` in the sweep directory, a short table on stdout, and
  ``latency_breakdown.png`` beside it."""

from __future__ import annotations

import logging
import threading
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


def finished_runs(sweep_dir: Path) -> int:
    return sum(1 for _ in sweep_dir.glob("**/result.json"))


class SweepProgress:
    """A tqdm bar driven by the number of result.json files under the sweep directory."""

    def __init__(self, sweep_dir: Path, total: int, interval_s: float = 0.5):
        from tqdm.auto import tqdm
        self.sweep_dir, self.total, self.interval_s = sweep_dir, total, interval_s
        self.bar = tqdm(total=total, desc="runs", unit="run")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="sweep-progress", daemon=True)
        self._thread.start()

    def _update(self) -> None:
        n = min(finished_runs(self.sweep_dir), self.total)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.bar.close()


class ResultsTable(Callback):
    def __init__(self) -> None:
        self.progress: SweepProgress | None = None

    def __getstate__(self) -> dict:
        # launchers pickle the callbacks into their workers; the bar and its thread stay here
        return {"progress": None}

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
            self.progress = SweepProgress(Path(config.hydra.sweep.dir), len(combos))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
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
