"""Fit the simulator's free timing constants to measurements, and say how well it then predicts
runs it was not fitted on.

    python -m experiments.calibrate_sim RESULTS... --base-hardware h100-vda \\
        --out conf/hardware/h100-vda-fit.yaml [--report fit.json] [--figure fit.png]

RESULTS are results.csv files (or sweep dirs) of backend=both (or backend=real) sweeps. Each
measured row is one point; the point's run is rebuilt from the resolved config Hydra saved in its
run directory (``.hydra/config.yaml``), re-planned once, and re-simulated for every candidate
profile. The points are split by ``--seed`` into a fit half and a held-out half; the constants are
fitted (least squares on log(predicted / measured), a weak pull towards the base values) on the
fit half only, and the error before (base profile) and after (fitted profile) is reported on the
held-out half, which the fit never saw.

Free constants (``--params``): ``read_scale`` (multiplies the whole flash read table and the
sequential rate), ``io_overhead_us``, ``op_overhead_us``, ``row_op_us``, ``compute_gbps``,
``mem_gbps``, ``compute_tflops``, ``h2d_gbps``; ``overlap`` is tried both ways (``--overlap``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from experiments.setup import RunSetup, build_run
from sim.errors import ConfigError, require
from sim.hardware import HardwareProfile
from sim.plan import PolicyEngine
from sim.simulator import simulate

log = logging.getLogger("flashlab")
PARAMS = ("read_scale", "io_overhead_us", "op_overhead_us", "row_op_us", "compute_gbps", "mem_gbps",
          "compute_tflops", "h2d_gbps")
DEFAULT_PARAMS = ("read_scale", "io_overhead_us", "op_overhead_us", "row_op_us", "compute_gbps", "mem_gbps")
FLOORS = {"io_overhead_us": 0.1, "op_overhead_us": 0.1, "row_op_us": 1e-4}  # log-space needs a start > 0


# ---- points --------------------------------------------------------------------------------
@dataclass
class Point:
    run_dir: Path
    measured_ms: float
    config: dict[str, Any]           # the run's resolved config (Hydra's .hydra/config.yaml)
    label: str = ""


def _find_run_dir(run_dir: str, tables: Sequence[Path]) -> Path | None:
    """The run directory as recorded, or (results copied elsewhere) beside the results table."""
    cand = [Path(run_dir)]
    for t in tables:
        base = t if t.is_dir() else t.parent
        cand += [base / Path(run_dir).name, base / Path(run_dir).parent.name / Path(run_dir).name]
    return next((c for c in cand if (c / ".hydra" / "config.yaml").exists()), None)


def load_points(results: Sequence[str | Path]) -> list[Point]:
    """Every measured row (backend=real, alone or as half of backend=both) with its run's config."""
    from experiments.figures import load_results
    tables = [Path(r) for r in results]
    df = load_results(tables)
    real = df[df["backend"] == "real"]
    require(not real.empty, "RESULTS", f"no measured rows (backend=real) in {', '.join(map(str, tables))}",
            "run a sweep with backend=both, e.g. python -m experiments.run -m +experiment=validation")
    points = []
    for r in real.itertuples():
        d = _find_run_dir(str(r.run_dir), tables)
        require(d is not None, "run_dir", f"{r.run_dir} (or a copy beside the results) has no .hydra/config.yaml",
                "keep each run directory (with its .hydra/) next to results.csv")
        cfg = OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml"), resolve=True)
        label = f"{r.policy} w{r.window} c{r.chunk_kib} s{r.sparsity:.2f} m{r.memory_budget}"
        points.append(Point(run_dir=d, measured_ms=float(r.latency_ms), config=cfg, label=label))
    return points


def split(n: int, seed: int, fit_fraction: float = 0.5, groups: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fit and held-out points: a seeded permutation, cut at ``fit_fraction``. With ``groups``
    (a label per point, e.g. the same configuration measured in several rounds) whole groups go to one side,
    so that no held-out point has a twin in the fit."""
    require(n >= 2, "RESULTS", f"{n} measured point(s): cannot hold any out", "measure at least 2 (24+ advised)")
    if groups is None:
        perm = np.random.default_rng(seed).permutation(n)
        k = min(max(1, int(round(n * fit_fraction))), n - 1)
        return np.sort(perm[:k]), np.sort(perm[k:])
    labels = list(dict.fromkeys(groups))
    require(len(labels) >= 2, "RESULTS", "all points are one group: cannot hold any group out",
            "measure at least two configurations")
    order = np.random.default_rng(seed).permutation(len(labels))
    fit_labels, count = set(), 0
    for i in order[:-1]:                                    # at least one group stays held out
        if count >= n * fit_fraction:
            break
        fit_labels.add(labels[i])
        count += sum(g == labels[i] for g in groups)
    is_fit = np.array([g in fit_labels for g in groups])
    return np.flatnonzero(is_fit), np.flatnonzero(~is_fit)


# ---- predicting a point for a candidate profile -------------------------------------------
class _Prepared:
    """A point rebuilt and planned once; ``predict`` re-times the same plans on any profile."""

    def __init__(self, config: dict[str, Any]):
        self.setup: RunSetup = build_run(OmegaConf.create(config))
        trace = self.setup.make_trace()
        self.plans = list(PolicyEngine(self.setup.spec, self.setup.policy).plan_trace(trace))

    def predict(self, hw: HardwareProfile) -> float:
        s = self.setup
        res = simulate(s.spec, hw, s.policy, plans=self.plans, granularity=s.backend.get("granularity", "batch"))
        return res.summary(s.warmup)["latency_ms"]


def _prepare(point):
    """A point ready to re-time: its own ``prepare()`` where it has one (e.g. a bench_engine record,
    benchmarks/resim_engine.py), else its run rebuilt from its Hydra config."""
    return point.prepare() if hasattr(point, "prepare") else _Prepared(point.config)


def _worker(conn, points: list) -> None:
    prepared = [_prepare(p) for p in points]
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        hw, which = HardwareProfile.from_dict(msg[0]), msg[1]
        conn.send([prepared[k].predict(hw) for k in which])


class Evaluator:
    """Predicted latency of every point for a profile; with ``jobs`` > 1 the points are spread over
    worker processes that keep their plans (planned once), so a fit costs only re-simulation. A point is a
    ``Point`` (a run's config) or anything with ``measured_ms`` and ``prepare()`` -> an object with
    ``predict(hw) -> ms``."""

    def __init__(self, points: Sequence[Point], jobs: int = 1):
        self.n = len(points)
        self.jobs = max(1, min(jobs, self.n))
        self.calls = 0
        if self.jobs == 1:
            self.prepared = [_prepare(p) for p in points]
            return
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
        self.parts = [list(range(i, self.n, self.jobs)) for i in range(self.jobs)]
        self.conns, self.procs = [], []
        for part in self.parts:
            a, b = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(b, [points[i] for i in part]), daemon=True)
            proc.start()
            b.close()                        # only the worker holds its end: its death ends our recv()
            self.conns.append(a)
            self.procs.append(proc)
        for c in self.conns:
            try:
                ready = c.recv()
            except EOFError:
                ready = None
            if ready != "ready":
                self.close()
                raise ConfigError("calibrate", "a worker failed to prepare its points (its error is printed above)",
                                  "run with --jobs 1 to see it here")

    def __call__(self, hw: HardwareProfile, which: Sequence[int] | None = None) -> np.ndarray:
        """Predicted latency (ms) of the points ``which`` (all by default), NaN for the others."""
        self.calls += 1
        wanted = set(range(self.n) if which is None else map(int, which))
        out = np.full(self.n, np.nan)
        if self.jobs == 1:
            for i in sorted(wanted):
                out[i] = self.prepared[i].predict(hw)
            return out
        d = hw.to_dict()
        asked = []
        for c, part in zip(self.conns, self.parts):
            mine = [k for k, i in enumerate(part) if i in wanted]
            c.send((d, mine))
            asked.append([part[k] for k in mine])
        for c, idx in zip(self.conns, asked):
            out[idx] = c.recv()
        return out

    def close(self) -> None:
        for c in getattr(self, "conns", []):
            with contextlib.suppress(OSError):
                c.send(None)
        for p in getattr(self, "procs", []):
            p.join(timeout=10)


# ---- the fit -------------------------------------------------------------------------------
def apply_params(base: HardwareProfile, names: Sequence[str], values: Sequence[float], overlap: bool,
                 name: str | None = None) -> HardwareProfile:
    """``base`` with the named constants set (``read_scale`` scales the read table and seq rate)."""
    changes: dict[str, Any] = {"overlap": overlap}
    for n, v in zip(names, map(float, values)):
        if n == "read_scale":
            changes["read_gbps"] = (np.asarray(base.read_gbps) * v).tolist()
            changes["seq_gbps"] = base.seq_gbps * v
        else:
            changes[n] = float(v)
    if name:
        changes["name"] = name
    return base.with_changes(**changes)


def start_values(base: HardwareProfile, names: Sequence[str]) -> np.ndarray:
    vals = []
    for n in names:
        require(n in PARAMS, "--params", f"{n!r} is not a free constant", f"use some of {list(PARAMS)}")
        v = 1.0 if n == "read_scale" else float(getattr(base, n))
        require(n != "h2d_gbps" or v > 0, "--params", "h2d_gbps is 0 in the base profile (a CPU machine)",
                "leave h2d_gbps out of --params")
        vals.append(max(v, FLOORS.get(n, 0.0)))
    return np.asarray(vals)


def errors_pct(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return (predicted - measured) / measured * 100.0


def summary(err: np.ndarray) -> dict[str, float]:
    a = np.abs(err)
    return {"median_abs_err_pct": float(np.median(a)), "max_abs_err_pct": float(np.max(a)),
            "mean_err_pct": float(np.mean(err))}


@dataclass
class Calibration:
    profile: HardwareProfile
    fit_idx: np.ndarray
    heldout_idx: np.ndarray
    before_pct: np.ndarray           # per point, base profile
    after_pct: np.ndarray            # per point, fitted profile
    values: dict[str, float]
    evaluations: int
    report: dict[str, Any] = field(default_factory=dict)


def fit(points: Sequence[Point], base: HardwareProfile, *, params: Sequence[str] = DEFAULT_PARAMS,
        overlap: str = "both", seed: int = 0, fit_fraction: float = 0.5, prior: float = 0.02,
        name: str | None = None, jobs: int = 1, max_evals: int = 300, groups: Sequence | None = None) -> Calibration:
    """Fit ``params`` of ``base`` on a seeded part of ``points``; report on the rest (``groups``: see split)."""
    from scipy.optimize import least_squares

    require(overlap in ("both", "true", "false", "keep"), "--overlap", f"unknown choice {overlap!r}",
            "use both, true, false or keep")
    measured = np.array([p.measured_ms for p in points])
    require(bool(np.all(measured > 0)), "latency_ms", "a measured latency is not > 0", "re-run those points")
    fit_idx, held_idx = split(len(points), seed, fit_fraction, groups)
    x0 = start_values(base, params)
    ev = Evaluator(points, jobs)
    try:
        before = errors_pct(ev(base), measured)
        choices = {"both": [True, False], "true": [True], "false": [False], "keep": [base.overlap]}[overlap]
        best = None
        for ov in choices:
            def residuals(z, ov=ov):
                hw = apply_params(base, params, x0 * np.exp(z), ov)
                pred = ev(hw, fit_idx)[fit_idx]  # the held-out points are never simulated here
                return np.concatenate([np.log(pred / measured[fit_idx]), prior * z])
            sol = least_squares(residuals, np.zeros(len(params)), diff_step=0.02, x_scale=1.0, bounds=(-12, 12),
                                ftol=1e-4, xtol=1e-4, max_nfev=max(3, max_evals // (len(choices) * (len(params) + 1))))
            if best is None or sol.cost < best[0].cost:
                best = (sol, ov)
        sol, ov = best
        values = x0 * np.exp(sol.x)
        fitted = apply_params(base, params, values, ov, name=name or f"{base.name}-fit")
        after = errors_pct(ev(fitted), measured)
        calls = ev.calls
    finally:
        ev.close()
    report = {
        "base_hardware": base.name, "fitted_hardware": fitted.name, "params": list(params), "overlap": ov,
        "values": {p: float(v) for p, v in zip(params, values)}, "seed": seed,
        "n_points": len(points), "n_fit": int(fit_idx.size), "n_heldout": int(held_idx.size),
        "fit_before": summary(before[fit_idx]), "fit_after": summary(after[fit_idx]),
        "heldout_before": summary(before[held_idx]), "heldout_after": summary(after[held_idx]),
        "evaluations": calls,
    }
    src = (f"fitted by experiments.calibrate_sim from {base.name} on {fit_idx.size} measured points "
           f"(seed {seed}); held-out ({held_idx.size}) median |err| "
           f"{report['heldout_before']['median_abs_err_pct']:.1f}% -> {report['heldout_after']['median_abs_err_pct']:.1f}%, "
           f"max {report['heldout_before']['max_abs_err_pct']:.1f}% -> {report['heldout_after']['max_abs_err_pct']:.1f}%")
    fitted = fitted.with_changes(source=src)
    return Calibration(profile=fitted, fit_idx=fit_idx, heldout_idx=held_idx, before_pct=before, after_pct=after,
                       values=report["values"], evaluations=calls, report=report)


def pairs_table(points: Sequence[Point], cal: Calibration) -> pd.DataFrame:
    """Held-out points, before and after, in the shape plots.predicted_vs_measured draws."""
    rows = []
    for series, err in (("before (base profile)", cal.before_pct), ("after (fitted profile)", cal.after_pct)):
        for i in cal.heldout_idx:
            m = points[i].measured_ms
            rows.append({"series": series, "measured_ms": m, "predicted_ms": m * (1 + err[i] / 100),
                         "error_pct": err[i], "label": points[i].label, "run_dir": str(points[i].run_dir)})
    return pd.DataFrame(rows)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"calibrated {r['base_hardware']} -> {r['fitted_hardware']} on {r['n_fit']} points; "
             f"{r['n_heldout']} held out (seed {r['seed']}), {r['evaluations']} profile evaluations",
             f"  overlap: {r['overlap']}"]
    lines += [f"  {k:>15s}: {v:.6g}" for k, v in r["values"].items()]
    lines.append(f"  {'':18s}{'median |err| %':>16s}{'max |err| %':>14s}{'mean err %':>12s}")
    for key in ("fit_before", "fit_after", "heldout_before", "heldout_after"):
        s = r[key]
        lines.append(f"  {key:18s}{s['median_abs_err_pct']:16.2f}{s['max_abs_err_pct']:14.2f}{s['mean_err_pct']:12.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.calibrate_sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.csv files or sweep dirs with backend=both/real rows")
    ap.add_argument("--base-hardware", required=True, help="starting profile: conf/hardware/NAME.yaml or a YAML path")
    ap.add_argument("--out", required=True, help="where to write the fitted profile (e.g. conf/hardware/NAME-fit.yaml)")
    ap.add_argument("--name", default=None, help="name of the fitted profile (default: the --out file's stem)")
    ap.add_argument("--params", default=",".join(DEFAULT_PARAMS), help=f"comma-separated, from {','.join(PARAMS)}")
    ap.add_argument("--overlap", default="both", choices=["both", "true", "false", "keep"])
    ap.add_argument("--seed", type=int, default=0, help="seeds the fit / held-out split")
    ap.add_argument("--fit-fraction", type=float, default=0.5)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for re-simulation")
    ap.add_argument("--report", default=None, help="write the report as JSON here")
    ap.add_argument("--figure", default=None, help="draw held-out predicted vs measured, before/after (PNG+PDF stem)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        base_arg = args.base_hardware
        base = HardwareProfile.from_yaml(base_arg) if base_arg.endswith(".yaml") else HardwareProfile.preset(base_arg)
        points = load_points(args.results)
        cal = fit(points, base, params=[p for p in args.params.split(",") if p], overlap=args.overlap,
                  seed=args.seed, fit_fraction=args.fit_fraction, name=args.name or Path(args.out).stem,
                  jobs=args.jobs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.profile.to_yaml(out)
    print(format_report(cal.report))
    print(f"profile: {out}  (use it with hardware={out.stem} if it is in conf/hardware/)")
    if args.report:
        Path(args.report).write_text(json.dumps(cal.report, indent=1))
    if args.figure:
        from experiments import plots
        stem = Path(args.figure)
        fig = plots.predicted_vs_measured(pairs_table(points, cal), title="Held-out points: before and after calibration")
        plots.save(fig, stem.parent, stem.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
