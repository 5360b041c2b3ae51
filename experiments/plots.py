"""Figures drawn from results tables (pandas DataFrames with the fixed result columns) or from
HardwareProfile tables. Each function returns a matplotlib Figure; ``save`` writes PNG and PDF.

Every axis says what it measures and in which unit."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

PARTS = [("io_ms", "flash I/O", "#c44e52"), ("mem_ms", "memory management", "#ccb974"),
         ("compute_ms", "compute", "#4c72b0")]
KNOBS = ["window", "chunk_kib", "memory_budget", "sparsity", "reads_in_flight"]
POLICY_ORDER = ["naive", "predictor", "windowing", "windowing_bundling"]


def _plt():
    import sys

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:  # headless by default; keep a notebook's inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def matplotlib_ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def save(fig, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as OUT_DIR/NAME.png and .pdf and close it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out_dir / f"{name}.{ext}"
        fig.savefig(path, dpi=130)
        paths.append(path)
    _plt().close(fig)
    return paths


def _policy_sorted(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda p: (POLICY_ORDER.index(p) if p in POLICY_ORDER else len(POLICY_ORDER), p))


def latency_breakdown(df: pd.DataFrame, path: str | Path) -> Path:
    """Stacked bars of I/O, memory management and compute per run, latency marked on top (one PNG;
    the multirun callback's quick look at any sweep).

    Parts can overlap in time (I/O runs beside compute), so the bar may be taller than the latency."""
    plt = _plt()
    df = df.reset_index(drop=True)
    labels = [f"{r.policy}\n{r.model}\n{r.hardware}" + ("" if r.backend == "sim" else f"\n[{r.backend}]")
              for r in df.itertuples()]
    fig, ax = plt.subplots(figsize=(min(max(5, 1.3 * len(df)), 40), 4.2))
    bottom = pd.Series(0.0, index=df.index)
    for col, name, color in PARTS:
        vals = df[col].astype(float).fillna(0.0)
        ax.bar(range(len(df)), vals, bottom=bottom, label=name, color=color, width=0.6)
        bottom += vals
    ax.scatter(range(len(df)), df["latency_ms"].astype(float), marker="_", s=600, color="black", label="latency", zorder=3)
    ax.set_xticks(range(len(df)), labels, fontsize=7)
    ax.set_ylabel("per-token time (ms)")
    ax.set_yscale("log" if df["latency_ms"].max() / max(df["latency_ms"].min(), 1e-9) > 30 else "linear")
    ax.set_title("Per-token latency and its parts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def breakdown_by_model(df: pd.DataFrame, title: str = ""):
    """One panel per model (and hardware): stacked I/O / memory / compute bars per policy, the
    latency as a black tick, the speed-up over naive above it."""
    plt = _plt()
    groups = list(df.groupby(["model", "hardware"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 0.8, 4.2), squeeze=False)
    for ax, ((model, hw), g) in zip(axes[0], groups):
        order = {p: i for i, p in enumerate(_policy_sorted(g["policy"]))}
        g = g.assign(_o=g["policy"].map(order)).sort_values(["_o", *KNOBS]).reset_index(drop=True)
        varying = [k for k in KNOBS if g[k].nunique() > 1]   # several runs per policy: say which
        g.index = [p.replace("_", "\n") + "".join(f"\n{k}={v}" for k, v in zip(varying, vals))
                   for p, *vals in g[["policy", *varying]].itertuples(index=False)]
        naive = g.loc[g["policy"] == "naive", "latency_ms"]
        x = np.arange(len(g))
        bottom = np.zeros(len(g))
        for col, name, color in PARTS:
            vals = g[col].astype(float).fillna(0.0).to_numpy()
            ax.bar(x, vals, bottom=bottom, color=color, width=0.65, label=name)
            bottom += vals
        lat = g["latency_ms"].astype(float).to_numpy()
        ax.scatter(x, lat, marker="_", s=500, color="black", zorder=3, label="latency")
        if len(naive):
            for xi, v in zip(x, lat):
                ax.annotate(f"{naive.iloc[0] / v:.1f}x", (xi, max(v, bottom[xi])), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x, g.index, fontsize=7)
        ax.set_title(f"{model} ({hw})", fontsize=9)
        ax.set_ylabel("per-token time (ms)")
        ax.set_ylim(0, max(bottom.max(), lat.max()) * 1.15)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "Per-token latency by policy: flash I/O, memory management, compute "
                 "(parts may overlap)", fontsize=10)
    fig.tight_layout()
    return fig


def _lines(ax, df: pd.DataFrame, x: str, y: str, scale: float = 1.0, **kw):
    for (policy, model, hw), g in df.groupby(["policy", "model", "hardware"], sort=False):
        g = g.sort_values(x)
        ax.plot(g[x], g[y].astype(float) * scale, marker="o", ms=3, label=f"{policy} ({model}, {hw})", **kw)


def window_tradeoff(df: pd.DataFrame, title: str = ""):
    """Flash traffic, resident cache memory and latency per token against the window size k."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    _lines(axes[0], df, "window", "bytes_per_token", 1e-6)
    axes[0].set_ylabel("flash read per token (MB)")
    _lines(axes[1], df, "window", "resident_mb")
    axes[1].set_ylabel("resident FFN neurons (MB, all layers)")
    _lines(axes[2], df, "window", "latency_ms")
    axes[2].set_ylabel("per-token latency (ms)")
    for ax in axes:
        ax.set_xlabel("window k (tokens)")
        ax.grid(alpha=0.3)
    ax2 = axes[0].twinx()  # reads per token share the x axis: the bundling gain is in the count
    for (policy, _, _), g in df.groupby(["policy", "model", "hardware"], sort=False):
        g = g.sort_values("window")
        ax2.plot(g["window"], g["reads_per_token"].astype(float) / 1e3, ls=":", lw=1)
    ax2.set_ylabel("reads per token (thousands, dotted)")
    axes[2].legend(fontsize=7)
    fig.suptitle(title or "Windowing: less flash traffic for a slowly growing cache", fontsize=10)
    fig.tight_layout()
    return fig


def memory_budget_latency(df: pd.DataFrame, title: str = ""):
    """Per-token latency against the share of the model allowed in memory."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, df, "memory_budget", "latency_ms")
    ax.set_xlabel("memory budget (fraction of the model's bytes in memory)")
    ax.set_ylabel("per-token latency (ms, log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title or "Latency vs memory budget", fontsize=10)
    fig.tight_layout()
    return fig


def prediction_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """One line per backend=both run: predicted (sim) and measured (real) per-token latency."""
    both = df[df["error_pct"].notna() & df["backend"].isin(["sim", "real"])]
    key = ["run_dir", "config_hash"] if both["config_hash"].notna().all() else ["run_dir"]
    sim = both[both["backend"] == "sim"].set_index(key)
    real = both[both["backend"] == "real"].set_index(key)
    common = sim.index.intersection(real.index)
    out = real.loc[common].copy()
    out["predicted_ms"] = sim.loc[common, "latency_ms"].astype(float)
    out["measured_ms"] = real.loc[common, "latency_ms"].astype(float)
    out["error_pct"] = (out["predicted_ms"] - out["measured_ms"]) / out["measured_ms"] * 100
    return out.reset_index()


def predicted_vs_measured(pairs: pd.DataFrame, title: str = "", labels: Sequence[str] = ()):
    """Left: predicted against measured per-token latency (log-log, y = x and +-10%). Right: the
    distribution of the signed error. ``pairs`` from ``prediction_pairs``; with a ``series``
    column (e.g. before / after calibration) each series gets its own colour."""
    plt = _plt()
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 4.2))
    series = pairs["series"] if "series" in pairs else pd.Series("prediction", index=pairs.index)
    lo = float(min(pairs["predicted_ms"].min(), pairs["measured_ms"].min())) * 0.8
    hi = float(max(pairs["predicted_ms"].max(), pairs["measured_ms"].max())) * 1.25
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, color="black", lw=1, label="exact")
    ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.2, label="+-10%")
    bins = np.linspace(min(-30, pairs["error_pct"].min()), max(30, pairs["error_pct"].max()), 25)
    for name in dict.fromkeys(series):
        p = pairs[series == name]
        med, worst = p["error_pct"].abs().median(), p["error_pct"].abs().max()
        lab = f"{name}: median |err| {med:.1f}%, max {worst:.1f}% (n={len(p)})"
        ax.scatter(p["measured_ms"], p["predicted_ms"], s=18, label=lab, alpha=0.8)
        hx.hist(p["error_pct"], bins=bins, alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured per-token latency (ms)")
    ax.set_ylabel("predicted per-token latency (ms)")
    ax.legend(fontsize=7)
    hx.axvline(0, color="black", lw=1)
    hx.set_xlabel("prediction error, (predicted - measured) / measured (%)")
    hx.set_ylabel("runs")
    hx.legend(fontsize=7)
    fig.suptitle(title or "Simulator vs measurement", fontsize=10)
    fig.tight_layout()
    return fig


def flash_throughput(profiles: Sequence, depths: Sequence[int] = (1, 4, 16, 64)):
    """Random-read throughput against read size for each profile (one panel each), one line per
    number of reads in flight, the sequential throughput dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.6 * len(profiles), 3.8), squeeze=False)
    for ax, hw in zip(axes[0], profiles):
        kib = np.geomspace(min(hw.read_kib), max(hw.read_kib), 60)
        for q in depths:
            ax.plot(kib, hw.read_throughput_gbps(kib * 1024, q), label=f"{q} in flight")
        ax.axhline(hw.seq_gbps, ls="--", color="grey", lw=1, label="sequential")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("read size (KiB)")
        ax.set_ylabel("random-read throughput (GB/s)")
        ax.set_title(hw.name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Flash: throughput vs read size and reads in flight", fontsize=10)
    fig.tight_layout()
    return fig
