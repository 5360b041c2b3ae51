"""Regenerate every figure from results tables, without Jupyter.

    python -m experiments.figures RESULTS... --out DIR      RESULTS: results.csv files or sweep dirs
    python -m experiments.figures --experiment NAME... --out DIR
    python -m experiments.figures --paper --out DIR         the paper-style figures, sweeps included, and
                                                            paper_comparison.csv/.md (experiments.paper_comparison)

With --paper (or --experiment) each sweep's results table is written beside its figure as NAME.csv, so
``python -m experiments.figures docs/figures/*.csv --out DIR`` redraws the committed figures without
rerunning. Which figure a table gets is decided by its ``study`` column (the experiment the runs came from,
conf/experiment/<study>.yaml): breakdown bars for paper_cpu / paper_breakdown, the window trade-off
for paper_window, latency vs budget for paper_memory; rows of any other study get breakdown bars
(sim rows) and every table with backend=both rows gets the predicted-vs-measured figure. The flash
throughput figure is drawn from the hardware profiles the tables name (or paper_flash's list).
Each figure is written as PNG and PDF (--formats to choose)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import yaml

from experiments import plots
from experiments.results import collect, frame, write_csv
from sim.errors import ConfigError
from sim.hardware import HardwareProfile
from sim.presets import CONF_DIR

log = logging.getLogger("flashlab")
PAPER = ["paper_flash", "paper_breakdown", "paper_window", "paper_memory"]
STUDY_FIGURES = {
    "paper_cpu": plots.breakdown_by_model,
    "paper_breakdown": plots.breakdown_by_model,
    "paper_window": plots.window_tradeoff,
    "paper_memory": plots.memory_budget_latency,
}


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One table from results.csv files and/or sweep directories (their results.csv, or their
    result.json files when the sweep never reached its end)."""
    tables = []
    for p in map(Path, paths):
        if p.is_dir():
            tables.append(pd.read_csv(p / "results.csv") if (p / "results.csv").exists() else collect(p))
        elif p.exists():
            tables.append(pd.read_csv(p))
        else:
            raise ConfigError("RESULTS", f"{p} does not exist", "give results.csv files or sweep directories")
    df = frame(pd.concat(tables, ignore_index=True).to_dict("records")) if tables else frame([])
    df["study"] = df["study"].astype(object).fillna("").astype(str)
    return df


def experiment_spec(name: str) -> dict:
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
        raise ConfigError("--experiment", f"no experiment named {name!r}", f"use one of {names}")
    return yaml.safe_load(path.read_text()) or {}


def hardware_profiles(names: Sequence[str]) -> list[HardwareProfile]:
    """Profiles by preset name or YAML path; names that resolve to neither are skipped with a note."""
    out = []
    for n in dict.fromkeys(names):
        try:
            out.append(HardwareProfile.from_yaml(n) if n.endswith(".yaml") else HardwareProfile.preset(n))
        except (ConfigError, OSError) as e:
            log.warning("no flash figure for hardware %r: %s", n, e)
    return out


def figures_from_results(df: pd.DataFrame, out: Path, hardware: Sequence[str] = (), flash: bool = True,
                         formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Every figure ``df`` supports, into ``out``; returns the files written."""
    written: list[Path] = []

    def save(fig, name: str) -> list[Path]:
        return plots.save(fig, out, name, formats)
    for study, rows in df.groupby("study", sort=False):
        name = study or "runs"
        sim = rows[rows["backend"] == "sim"]
        draw = STUDY_FIGURES.get(study)
        if draw is not None and not sim.empty:
            written += save(draw(sim), name)
        elif not sim.empty and draw is None:
            written += save(plots.breakdown_by_model(sim, title=f"{name}: per-token latency by policy"),
                            f"{name}_breakdown")
        pairs = plots.prediction_pairs(rows)
        if not pairs.empty:
            written += save(plots.predicted_vs_measured(pairs, title=f"{name}: simulator vs measurement"),
                            f"{name}_predicted_vs_measured")
    profiles = hardware_profiles(list(hardware) or sorted(df["hardware"].dropna().unique())) if flash else []
    if profiles:
        written += save(plots.flash_throughput(profiles), "flash_throughput")
    return written


def run_experiment(name: str, out: Path, tokens: int | None = None, extra: Sequence[str] = (),
                   formats: Sequence[str] = ("png", "pdf"), sweeps: Path | None = None) -> list[Path]:
    """Draw a figure-only experiment, or run a sweep experiment (resumable, into SWEEPS/NAME, by default
    OUT/sweeps/NAME), write its results table as OUT/NAME.csv and draw its figures."""
    spec = experiment_spec(name)
    fig = spec.get("figure")
    if fig is not None:
        if fig.get("kind") != "flash_throughput":
            raise ConfigError(f"experiment/{name}.yaml: figure.kind", f"unknown figure {fig.get('kind')!r}",
                              "use kind: flash_throughput")
        profiles = hardware_profiles(fig.get("hardware", ["m1-max"]))
        return plots.save(plots.flash_throughput(profiles, fig.get("depths", [1, 4, 16, 64])), out, name, formats)
    from experiments.sweep import run_multirun
    overrides = [f"+experiment={name}", *([f"tokens={tokens}"] if tokens else []), *extra]
    df = run_multirun(overrides, (sweeps or out / "sweeps") / name)
    df["study"] = df["study"].astype(object).fillna("").astype(str)
    out.mkdir(parents=True, exist_ok=True)
    table = write_csv(df.drop(columns=["run_dir", "wall_s"]), out / f"{name}.csv")   # drop what differs per machine
    return [table, *figures_from_results(df, out, flash=False, formats=formats)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", help="results.csv files or sweep directories")
    ap.add_argument("--out", default="figures", help="output directory (default: figures/)")
    ap.add_argument("--experiment", nargs="+", default=[], metavar="NAME",
                    help="conf/experiment/NAME.yaml: draw it, running its sweep first if it is one")
    ap.add_argument("--paper", action="store_true", help=f"all paper-style figures: {', '.join(PAPER)}")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per run for the sweeps (default: 50 with --paper, else the experiment's)")
    ap.add_argument("--hardware", nargs="+", default=[], help="profiles for the flash figure (names or YAML)")
    ap.add_argument("--formats", nargs="+", default=["png", "pdf"], help="file formats (default: png pdf)")
    ap.add_argument("--sweep-dir", type=Path, default=None, help="where sweeps run (default: OUT/sweeps)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not (args.results or args.experiment or args.paper):
        ap.error("give RESULTS, --experiment NAME or --paper")
    out = Path(args.out)
    t0 = time.perf_counter()
    written: list[Path] = []
    try:
        if args.results:
            written += figures_from_results(load_results(args.results), out, args.hardware, formats=args.formats)
        names = list(dict.fromkeys((PAPER if args.paper else []) + args.experiment))
        tokens = args.tokens or (50 if args.paper else None)
        for name in names:
            written += run_experiment(name, out, tokens, formats=args.formats, sweeps=args.sweep_dir)
        if args.paper:   # every per-token number the paper publishes beside the simulator's (issue 26)
            from experiments.paper_comparison import write_paper_comparison
            write_paper_comparison(out, json_path=None)
            written += [out / "paper_comparison.csv", out / "paper_comparison.md"]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    print(f"{len(written)} files in {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
