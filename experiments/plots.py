"""Figures drawn from results tables (pandas DataFrames with the fixed result columns)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PARTS = [("io_ms", "flash I/O", "#c44e52"), ("mem_ms", "memory management", "#ccb974"),
         ("compute_ms", "compute", "#4c72b0")]


def latency_breakdown(df: pd.DataFrame, path: str | Path) -> Path:
    """Stacked bars of I/O, memory management and compute per run, latency marked on top.

    Parts can overlap in time (I/O runs beside compute), so the bar may be taller than the latency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.reset_index(drop=True)
    labels = [f"{r.policy}\n{r.model}\n{r.hardware}" + ("" if r.backend == "sim" else f"\n[{r.backend}]")
              for r in df.itertuples()]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(df)), 4.2))
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
