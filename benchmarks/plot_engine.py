"""Plot a bench_engine run: per step, ms per token and speed-up over naive, every round a dot.

    python benchmarks/plot_engine.py [benchmarks/results/engine.json] [--out benchmarks/results/engine.png]

Left: ms per token of each step (dots: rounds; bar: median), its I/O lower bound (open circles) and the
latency that 20x the median naive would need (dashed). Right: each round's speed-up over the same round's
naive, with the 20x target. Torch-free: re-plots any committed results file; bench_engine.py calls it at
the end of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 20.0


def plot_engine(records: list[dict], out: Path, title: str = "") -> Path:
    """Write ``out`` (png) from bench_engine records; steps in the order they first appear, naive left out
    of the bars (its /20 line stands for it)."""
    from experiments import plots

    plt = plots._plt()
    steps = [s for s in dict.fromkeys(r["policy"] for r in records) if s != "naive"]
    naive = [r["latency_ms"] for r in records if r["policy"] == "naive"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for i, step in enumerate(steps):
        rs = [r for r in records if r["policy"] == step]
        lat = [r["latency_ms"] for r in rs]
        ax.bar(i, np.median(lat), color="C0", alpha=0.35, width=0.6)
        ax.plot([i] * len(lat), lat, "o", color="C0", ms=4)
        bound = [r["io_lower_bound_ms"] for r in rs if r.get("io_lower_bound_ms")]
        ax.plot([i + 0.2] * len(bound), bound, "o", mfc="none", color="C3", ms=4,
                label="I/O lower bound" if i == 0 else None)
        speed = [r["speedup_vs_naive"] for r in rs if r.get("speedup_vs_naive")]
        bx.plot([i] * len(speed), speed, "o", color="C2", ms=4)
        if speed:
            bx.hlines(np.median(speed), i - 0.3, i + 0.3, color="C2")
    if naive:
        ax.axhline(np.median(naive) / TARGET, color="k", ls="--", lw=1,
                   label=f"{TARGET:g}x the median naive ({np.median(naive):.0f} ms)")
    bx.axhline(TARGET, color="k", ls="--", lw=1, label=f"{TARGET:g}x target")
    for a in (ax, bx):
        a.set_xticks(range(len(steps)), [s.replace("+", "\n+") for s in steps], fontsize=7)
    ax.set_ylabel("ms per token (dots: rounds, bar: median)")
    bx.set_ylabel("speed-up over the same round's naive")
    ax.legend(loc="upper right", fontsize=8)
    bx.legend(loc="lower right", fontsize=8)
    if records:
        r0 = records[0]
        fig.suptitle(title or f"{r0.get('model')} on {r0.get('device')}, {r0.get('date')}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    return plots.save(fig, out.parent, out.stem, formats=("png",))[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    ap.add_argument("--out", default=None, help="png path (default: beside the results file, <results stem>.png)")
    args = ap.parse_args(argv)
    path = Path(args.results)
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable bench_engine results file ({e}). Fix: give "
                         "benchmarks/results/engine*.json")
    if not records or not all("policy" in r and "latency_ms" in r for r in records):
        raise SystemExit(f"{path}: no bench_engine records (policy, latency_ms). Fix: give a bench_engine.py results file")
    out = Path(args.out) if args.out else path.with_suffix(".png")
    print(plot_engine(records, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
