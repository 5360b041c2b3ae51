"""Validation of the simulator against this machine: the ``validation`` experiment (32 backend=both
points over policy x chunk x window x sparsity x memory budget), then calibration of the
simulator's free timing constants on half of the points and the error on the other half.

    python benchmarks/bench_validation.py --model opt-6.7b --hardware h100-vda --cache-dir /root/flash

Writes (under --out, default benchmarks/):
  results/validation.md              the human-readable table (per point, and the summary)
  results/validation.json            [{device, date, model, n_fit, n_heldout, median_abs_err_pct,
                                       max_abs_err_pct, ...}] (held-out error after calibration)
  validation/results.csv             the sweep's rows; validation/<n>/ each run's result.json and
                                       .hydra/config.yaml (enough to re-simulate: calibrate_sim)
  validation/<hardware>-fit.yaml     the fitted profile; validation/calibration.json its report
  validation/validation_heldout.png/.pdf   held-out predicted vs measured, before / after
(validation/engine_runs/ holds the measured bench_engine runs resim_engine re-simulates; kept.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from experiments import plots  # noqa: E402
from experiments.calibrate_sim import fit, format_report, load_points, pairs_table  # noqa: E402
from experiments.results import collect, write_csv  # noqa: E402
from experiments.sweep import run_multirun  # noqa: E402
from sim.hardware import HardwareProfile  # noqa: E402


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def keep_run_files(sweep: Path, dest: Path) -> None:
    """The sweep's table and, per run, what re-simulating needs (no logs, no flash data). Replaces the previous
    sweep's run directories (pNN/ and the like) and results.csv only: ``dest`` also keeps resim_engine's
    measured engine runs (engine_runs/) and fits."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in [*dest.glob("*/result.json"), *dest.glob("*/.hydra")]:
        if old.parent.name != "engine_runs":
            shutil.rmtree(old.parent, ignore_errors=True)
    (dest / "results.csv").unlink(missing_ok=True)
    write_csv(collect(sweep), dest / "results.csv")     # also when the sweep was cut short
    for res in sweep.glob("*/result.json"):
        run = dest / res.parent.name
        (run / ".hydra").mkdir(parents=True)
        shutil.copy(res, run / "result.json")
        shutil.copy(res.parent / ".hydra" / "config.yaml", run / ".hydra" / "config.yaml")
        if (res.parent / "real_tokens.csv").exists():
            shutil.copy(res.parent / "real_tokens.csv", run / "real_tokens.csv")


def sweep_points(seed: int) -> list[list[str]]:
    """The validation experiment's grid (its ``hydra.sweeper.params``) as one override list per
    point, in a seeded random order: slow drift of the machine (this virtual disk drifts by tens of
    percent over minutes) then spreads over all configs instead of biasing the last block of the grid."""
    import itertools
    import random

    from omegaconf import OmegaConf
    from sim.presets import CONF_DIR

    params = OmegaConf.load(Path(CONF_DIR) / "experiment" / "validation.yaml").hydra.sweeper.params
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    points = [list(p) for p in itertools.product(*axes)]
    random.Random(seed).shuffle(points)
    return points


def run_points(points: list[list[str]], common: list[str], sweep: Path) -> None:
    """One single-job multirun per point, into ``sweep/pNN`` (stable names: a rerun resumes)."""
    for k, point in enumerate(points):
        print(f"[{k + 1}/{len(points)}] {' '.join(point)}", flush=True)
        run_multirun([*common, *point, f"hydra.sweep.subdir=p{k:02d}"], sweep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--hardware", default="h100-vda", help="the sim side's profile, and the fit's start")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--cache-dir", default="cache/flash", help="where the flash weights are built (big)")
    ap.add_argument("--sweep-dir", default=None, help="default: a scratch dir; reuse one to resume")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--seed", type=int, default=0, help="fit / held-out split")
    ap.add_argument("--jobs", type=int, default=4, help="processes re-simulating during the fit")
    ap.add_argument("--max-evals", type=int, default=300)
    ap.add_argument("--skip-sweep", action="store_true",
                    help="calibrate and report from the runs already in --sweep-dir (e.g. a sweep cut short on the "
                         "device, copied back); the device is the one recorded in SWEEP_DIR/device.txt")
    ap.add_argument("--order", choices=("shuffled", "grid"), default="shuffled",
                    help="shuffled (default): points in a random order seeded by --seed; grid: Hydra's order")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)

    out = Path(args.out)
    sweep = Path(args.sweep_dir or f"/tmp/flashlab-validation-{args.model}")
    t0 = time.perf_counter()
    if not args.skip_sweep:
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / "device.txt").write_text(device_name())
        common = ["+experiment=validation", f"model={args.model}", f"hardware={args.hardware}",
                  f"tokens={args.tokens}", f"warmup={args.warmup}", f"backend.cache_dir={args.cache_dir}",
                  *args.overrides]
        if args.order == "grid":
            run_multirun(common, sweep)
        else:
            points = sweep_points(args.seed)
            swept = {o.split("=", 1)[0] for o in points[0]}
            clash = sorted(swept & {o.split("=", 1)[0].lstrip("+~") for o in args.overrides})
            if clash:   # each point sets these keys last, so the override would be silently ignored
                ap.error(f"{', '.join(clash)} are swept by conf/experiment/validation.yaml; "
                         "drop the override, or use --order grid")
            run_points(points, common, sweep)
    device = (sweep / "device.txt").read_text().strip() if (sweep / "device.txt").exists() else device_name()
    t_sweep = time.perf_counter() - t0
    keep_run_files(sweep, out / "validation")

    points = load_points([out / "validation" / "results.csv"])
    base = HardwareProfile.preset(args.hardware)
    t1 = time.perf_counter()
    cal = fit(points, base, seed=args.seed, jobs=args.jobs, max_evals=args.max_evals, name=f"{args.hardware}-fit")
    t_fit = time.perf_counter() - t1
    report = cal.report
    print(format_report(report))
    cal.profile.to_yaml(out / "validation" / f"{args.hardware}-fit.yaml")
    (out / "validation" / "calibration.json").write_text(json.dumps(report, indent=1))
    pairs = pairs_table(points, cal)
    fig = plots.predicted_vs_measured(pairs, title=f"{args.model} on {device}: held-out points, "
                                                   f"before / after calibration")
    plots.save(fig, out / "validation", "validation_heldout")

    when = (sweep / "device.txt").stat().st_mtime if (sweep / "device.txt").exists() else time.time()
    date = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # of the measurement
    tokens, warmup = points[0].config["tokens"], points[0].config["warmup"]
    held = report["heldout_after"]
    record = {"device": device, "date": date, "model": args.model, "n_fit": report["n_fit"],
              "n_heldout": report["n_heldout"], "median_abs_err_pct": round(held["median_abs_err_pct"], 3),
              "max_abs_err_pct": round(held["max_abs_err_pct"], 3),
              "median_abs_err_pct_before": round(report["heldout_before"]["median_abs_err_pct"], 3),
              "max_abs_err_pct_before": round(report["heldout_before"]["max_abs_err_pct"], 3),
              "base_hardware": args.hardware, "tokens": tokens, "warmup": warmup, "seed": args.seed,
              "sweep_s": round(t_sweep, 1), "fit_s": round(t_fit, 1)}
    write_results(out / "results" / "validation.json", [record])

    lines = [f"# Simulator validation: {args.model} on {device} ({date})", "",
             f"{len(points)} backend=both points (conf/experiment/validation.yaml), {tokens} tokens each "
             f"({warmup} warm-up). Sim profile before: `{args.hardware}`; fitted on {report['n_fit']} points "
             f"(seed {args.seed}), judged on the other {report['n_heldout']}.", "",
             "| split | profile | median abs err % | max abs err % | mean err % |", "|---|---|---|---|---|"]
    for key, split, prof in (("fit_before", "fit", "base"), ("fit_after", "fit", "fitted"),
                             ("heldout_before", "held-out", "base"), ("heldout_after", "held-out", "fitted")):
        s = report[key]
        lines.append(f"| {split} | {prof} | {s['median_abs_err_pct']:.2f} | {s['max_abs_err_pct']:.2f} | {s['mean_err_pct']:.2f} |")
    lines += ["", "Fitted constants: " + ", ".join(f"{k}={v:.4g}" for k, v in report["values"].items())
              + f", overlap={report['overlap']}", "",
              "| held-out point | measured ms | predicted before | predicted after | err before % | err after % |",
              "|---|---|---|---|---|---|"]
    for i in cal.heldout_idx:
        m = points[i].measured_ms
        lines.append(f"| {points[i].label} | {m:.2f} | {m * (1 + cal.before_pct[i] / 100):.2f} | "
                     f"{m * (1 + cal.after_pct[i] / 100):.2f} | {cal.before_pct[i]:+.1f} | {cal.after_pct[i]:+.1f} |")
    lines.append(f"\nsweep {t_sweep:.0f} s{' (not run here: --skip-sweep)' if args.skip_sweep else ''}, "
                 f"fit {t_fit:.0f} s ({report['evaluations']} profile evaluations)")
    atomic_write_text(out / "results" / "validation.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(cal.heldout_idx) - 12:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
