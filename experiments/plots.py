"""Figures drawn from results tables (pandas DataFrames with the fixed result columns) or from
HardwareProfile tables. Each function returns a matplotlib Figure; ``save`` writes PNG and PDF.

Every axis says what it measures and in which unit."""

from __future__ import annotations

import logging
import textwrap
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from sim.model_spec import ModelSpec
from sim.presets import CONF_DIR, load_preset

log = logging.getLogger("flashlab")
PARTS = [("io_ms", "flash I/O", "#c44e52"), ("mem_ms", "memory management", "#ccb974"),
         ("compute_ms", "compute", "#4c72b0")]
KNOBS = ["window", "chunk_kib", "memory_budget", "sparsity", "reads_in_flight"]
KNOB_TEXT = {"window": "window {}", "chunk_kib": "{} KiB reads", "memory_budget": "budget {}",
             "sparsity": "sparsity {}", "reads_in_flight": "{} reads in flight"}
POLICY_ORDER = ["naive", "predictor", "windowing", "windowing_bundling"]
# The paper's read throughputs on the M1 Max (v3 Table 2, a 16-bit OPT-6.7B, 32 threads (Sec. 4.1): neuron rows of
# 2 x 4096 bytes alone, then bundled in pairs; v3 Sec. 2.2: a 1 GiB linear read): (read KiB, GB/s, legend)
PAPER_FLASH = {"m1-max": [(8, 1.25, "paper: 8 KiB rows, 32 threads, 1.25 GB/s (v3 Table 2)"),
                          (16, 2.25, "paper: 16 KiB bundles, 2.25 GB/s (v3 Table 2)"),
                          (4096, 6.1, "paper: dense read 6.1 GB/s (v3 Table 2, Sec. 2.2)")]}
PAPER_STYLE = {"edgecolor": "black", "hatch": "////", "lw": 0.6}   # the paper's own values: hatched
PAPER_POLICY = {"naive": "naive", "all": "windowing_bundling"}    # its Table 3 names -> ours (all = the full method)
PAPER_DEVICE = {"m1-max": ("m1-max-cpu", 4)}                      # our profile -> its device and bytes per weight


@lru_cache(maxsize=1)
def paper_record() -> dict[str, Any]:
    """conf/paper/llm_in_a_flash.yaml (the paper's published numbers with citations); {} where it is missing."""
    path = CONF_DIR / "paper" / "llm_in_a_flash.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def dtype_bytes(rows: pd.DataFrame) -> float:
    """Bytes per weight of these runs (one model), from their resident cache: resident_mb is resident_neurons x the
    model's neuron bytes (experiments.results.make_row); NaN where no run keeps neurons or the model is unknown."""
    held = rows[rows["resident_neurons"].fillna(0) > 0] if "resident_neurons" in rows else rows.iloc[:0]
    try:
        spec = ModelSpec.preset(str(rows["model"].iloc[0]))
    except Exception:       # a model outside conf/model
        return float("nan")
    if held.empty:
        return float("nan")
    r = held.iloc[0]
    return float(r["resident_mb"]) * 1e6 / float(r["resident_neurons"]) / (spec.ffn_matrices * spec.d_model)


def paper_device(rows: pd.DataFrame) -> str | None:
    """The paper's device name for these runs (one model and hardware), where the paper measured that setting."""
    if rows.empty or rows["hardware"].iloc[0] not in PAPER_DEVICE:
        return None
    device, nbytes = PAPER_DEVICE[rows["hardware"].iloc[0]]
    return device if abs(dtype_bytes(rows) - nbytes) < 0.01 else None


def paper_latency(model: str, device: str | None) -> dict[str, dict[str, float]]:
    """{our policy: {io_ms, mem_ms, compute_ms, latency_ms}} from the paper's Table 3 (v3) for ``model`` on
    ``device``; I/O alone (v3 Table 2, OPT-6.7B on the M1 Max) for the policies Table 3 does not list."""
    out: dict[str, dict[str, float]] = {}
    if device is None:
        return out
    part_col = {"io": "io_ms", "mem": "mem_ms", "compute": "compute_ms", "total": "latency_ms"}
    for r in paper_record().get("latencies", []):
        if (r.get("model"), r.get("device"), r.get("source")) == (model, device, "v3 Table 3") and \
                r.get("policy") in PAPER_POLICY and r.get("part") in part_col:
            out.setdefault(PAPER_POLICY[r["policy"]], {})[part_col[r["part"]]] = float(r["paper_ms"])
    if device.startswith("m1-max"):
        for r in paper_record().get("io_ablation", []):
            if r.get("model") == model and r.get("policy") in POLICY_ORDER and r["policy"] not in out:
                out[r["policy"]] = {"io_ms": float(r["io_ms"])}
    return out


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts of ``fig`` whose boxes intersect: tick labels (those inside the view), axis labels,
    titles, annotations, legend entries, figure texts. Empty for a figure whose every label can be read."""
    from matplotlib.text import Text
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts: list[Text] = [*fig.texts, *(t for leg in fig.legends for t in leg.get_texts())]
    texts += [t for t in (getattr(fig, "_suptitle", None),) if t is not None]
    for ax in fig.axes:
        texts += [t for t in (ax.title, getattr(ax, "_left_title", None), getattr(ax, "_right_title", None)) if t]
        texts += ax.texts
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            texts.append(axis.label)
            lo, hi = sorted(axis.get_view_interval())
            pad = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks()):
                if tick.get_visible() and lo - pad <= tick.get_loc() <= hi + pad:
                    texts += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    drawn = [t for t in dict.fromkeys(texts) if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer).expanded(1.0, 1.0)) for t in drawn]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2)
            if min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 0.5 and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 0.5]


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
    clash = overlapping_texts(fig)
    if clash:
        log.warning("%s: %d overlapping labels, e.g. %r and %r", name, len(clash), *clash[0])
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


def _knob_value(knob: str, v) -> str:
    return f"{float(v):.3f}" if knob == "sparsity" else f"{v:g}" if isinstance(v, float) else str(v)


def knob_summary(g: pd.DataFrame, knobs: Sequence[str] = KNOBS) -> tuple[str, list[str]]:
    """The knobs of a panel said once: each knob with the value of the last policy (the paper's full method where
    present) and the policies that differ ("window 5 (naive, predictor: 0)"). Returns (that text, the knobs that
    vary within one policy: those go under the bars)."""
    parts, per_bar = [], []
    last = _policy_sorted(g["policy"])[-1]
    for k in knobs:
        vals = g[k].map(lambda v, k=k: _knob_value(k, v))
        if vals.groupby(g["policy"]).nunique().max() > 1:
            per_bar.append(k)
            continue
        by_policy = dict(zip(g["policy"], vals))
        main = by_policy[last]
        others: dict[str, list[str]] = {}
        for p in _policy_sorted(by_policy):
            if by_policy[p] != main:
                others.setdefault(by_policy[p], []).append(p)
        text = KNOB_TEXT[k].format(main)
        if others:
            text += " (" + "; ".join(f"{', '.join(ps)}: {v}" for v, ps in others.items()) + ")"
        parts.append(text)
    return ", ".join(parts), per_bar


def breakdown_by_model(df: pd.DataFrame, title: str = ""):
    """One panel per model (and hardware): stacked I/O / memory / compute bars per policy, the latency as a black
    tick, the speed-up over naive above it; the panel's knobs once, under its title; beside a bar, hatched, the
    paper's own value where it gives one (v3 Table 3; I/O only from Table 2 for the policies Table 3 lacks)."""
    plt = _plt()
    groups = list(df.groupby(["model", "hardware"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.3 * len(groups) + 0.6, 4.6), squeeze=False)
    any_paper = False
    for ax, ((model, hw), g) in zip(axes[0], groups):
        order = {p: i for i, p in enumerate(_policy_sorted(g["policy"]))}
        g = g.assign(_o=g["policy"].map(order)).sort_values(["_o", *KNOBS]).reset_index(drop=True)
        knobs, varying = knob_summary(g)
        labels = [p.replace("_", "\n") + "".join(f"\n{KNOB_TEXT[k].format(_knob_value(k, v))}"
                                                 for k, v in zip(varying, vals))
                  for p, *vals in g[["policy", *varying]].itertuples(index=False)]
        naive = g.loc[g["policy"] == "naive", "latency_ms"]
        paper = paper_latency(model, paper_device(g))
        x = np.arange(len(g))
        bottom = np.zeros(len(g))
        for col, name, color in PARTS:
            vals = g[col].astype(float).fillna(0.0).to_numpy()
            ax.bar(x, vals, bottom=bottom, color=color, width=0.6, label=name)
            bottom += vals
        lat = g["latency_ms"].astype(float).to_numpy()
        ax.scatter(x, lat, marker="_", s=400, color="black", zorder=3, label="latency")
        top = max(bottom.max(), lat.max())
        for xi, p in zip(x, g["policy"]):         # the paper's value beside the simulated one, hatched
            ref = paper.get(p)
            if ref is None:
                continue
            base = 0.0
            for col, _, color in PARTS:
                if col in ref:
                    ax.bar(xi + 0.42, ref[col], bottom=base, width=0.2, facecolor=color, alpha=0.5, **PAPER_STYLE)
                    base += ref[col]
            top, any_paper = max(top, base, ref.get("latency_ms", 0.0)), True
        if len(naive):
            for xi, v in zip(x, lat):
                ax.annotate(f"{naive.iloc[0] / v:.1f}x", (xi, max(v, bottom[xi])), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlim(-0.6, len(g) - 0.25)
        ax.set_title(f"{model} ({hw})\n" + "\n".join(textwrap.wrap(knobs, 48)), fontsize=7.5)
        ax.set_ylabel("per-token time (ms)")
        ax.set_ylim(0, top * 1.12)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in PARTS]
    names = [n for _, n, _ in PARTS]
    handles.append(plt.Line2D([], [], color="black", marker="_", ls="", ms=12))
    names.append("latency (speed-up over naive above)")
    if any_paper:
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", **PAPER_STYLE))
        names.append("the paper's own value (v3 Table 3: naive, All = windowing_bundling; Table 2: I/O only)")
    fig.legend(handles, names, loc="lower center", ncol=len(names) if len(groups) > 2 else 2, fontsize=7,
               frameon=False)
    fig.suptitle(title or "Per-token latency by policy: flash I/O, memory management, compute "
                 "(parts may overlap)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if len(groups) > 2 else 0.12, 1, 1))
    return fig


def _lines(ax, df: pd.DataFrame, x: str, y: str, scale: float = 1.0, **kw) -> dict[str, str]:
    """One line per policy (and model, hardware); returns each policy's colour."""
    colors = {}
    for (policy, model, hw), g in df.groupby(["policy", "model", "hardware"], sort=False):
        g = g.sort_values(x)
        line, = ax.plot(g[x], g[y].astype(float) * scale, marker="o", ms=3, label=f"{policy} ({model}, {hw})", **kw)
        colors[policy] = line.get_color()
    return colors


def _subtitle(df: pd.DataFrame, swept: str) -> str:
    """The knobs every line shares (all but the swept one), for a title's second line."""
    text, _ = knob_summary(df, [k for k in KNOBS if k != swept])
    return "\n".join(textwrap.wrap(text, 110))


def ffn_mb(rows: pd.DataFrame) -> float:
    """The whole FFN's size (MB, all layers) of these runs' model and dtype; NaN where it cannot be told."""
    spec = ModelSpec.preset(str(rows["model"].iloc[0]))
    return dtype_bytes(rows) * spec.ffn_matrices * spec.d_model * spec.d_ff * spec.n_layers / 1e6


def paper_window_shares(model: str) -> dict[str, float] | None:
    """The paper's window, union and new share per token for ``model`` (its trace preset's targets), if stated."""
    try:
        t = load_preset("trace", f"{model}-paper").get("targets", {})
    except Exception:
        return None
    return t if {"window", "window_union", "new_per_token"} <= set(t) else None


WINDOW_CAPTION = ("k = 0 keeps no cache, so it has no memory management; from k = 1 the neurons entering and leaving "
                  "the window are copied in memory. That cost is worth it where the window saves many reads, as with "
                  "the predictor's flagged sets here; with the true active sets of a trace with little reuse "
                  "(trace=synthetic, policy.predictor=oracle) it is not, and the latency rises from k = 0 to 2 "
                  "(docs/experiments.md).")


def window_tradeoff(df: pd.DataFrame, title: str = ""):
    """Flash traffic, resident cache memory and latency per token against the window size k; the paper's read and
    resident share at its window (stars) where it states them."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
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
    for model, g in df.groupby("model", sort=False):
        shares, mb = paper_window_shares(model), ffn_mb(g)
        if shares and np.isfinite(mb):
            k = shares["window"]
            axes[0].plot([k], [shares["new_per_token"] * mb], "k*", ms=9, label=f"paper, {model}: {100 * shares['new_per_token']:g}% new at k={k}")
            axes[1].plot([k], [shares["window_union"] * mb], "k*", ms=9, label=f"paper, {model}: {100 * shares['window_union']:g}% of the FFN at k={k}")
            axes[0].legend(fontsize=7, loc="upper right")
            axes[1].legend(fontsize=7, loc="lower right")
    axes[2].legend(fontsize=7)
    fig.suptitle((title or "Windowing: less flash traffic for a slowly growing cache") + "\n" + _subtitle(df, "window"),
                 fontsize=9)
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(WINDOW_CAPTION, 170)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def memory_budget_latency(df: pd.DataFrame, title: str = ""):
    """Per-token latency against the share of the model allowed in memory; the paper's latency at its budget
    (v3 Table 3, diamonds) where it gives one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = _lines(ax, df, "memory_budget", "latency_ms")
    for (model, hw), g in df.groupby(["model", "hardware"], sort=False):
        budget = paper_budget(model)
        for policy, ref in paper_latency(model, paper_device(g)).items():
            if policy in colors and "latency_ms" in ref:
                ax.plot([budget], [ref["latency_ms"]], marker="D", ms=7, ls="", mfc="none", mec=colors[policy],
                        mew=1.5, label=f"paper: {policy} ({model}, v3 Table 3)")
    ax.set_xlabel("memory budget (fraction of the model's bytes in memory)")
    ax.set_ylabel("per-token latency (ms, log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title((title or "Latency vs memory budget") + "\n" + _subtitle(df, "memory_budget"), fontsize=8)
    fig.tight_layout()
    return fig


def paper_budget(model: str) -> float:
    """The memory budget of the paper's runs of ``model`` (its trace preset's paper.memory_budget; else 0.5)."""
    try:
        return float(load_preset("trace", f"{model}-paper")["paper"]["memory_budget"])
    except Exception:
        return 0.5


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
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.2 * len(profiles), 5.0), squeeze=False)
    for ax, hw in zip(axes[0], profiles):
        kib = np.geomspace(min(hw.read_kib), max(hw.read_kib), 60)
        for q in depths:
            ax.plot(kib, hw.read_throughput_gbps(kib * 1024, q), label=f"{q} in flight")
        ax.axhline(hw.seq_gbps, ls="--", color="grey", lw=1, label="sequential")
        marks = PAPER_FLASH.get(hw.name, [])
        for i, (kib_, gbps, text) in enumerate(marks):
            ax.plot([kib_], [gbps], "kD" if i < len(marks) - 1 else "k*", ms=6, mfc="none" if i < len(marks) - 1 else "k",
                    ls="", label=text)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("read size (KiB)")
        ax.set_ylabel("random-read throughput (GB/s)")
        ax.set_title(hw.name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("Flash: throughput vs read size and reads in flight", fontsize=10)
    fig.tight_layout()
    return fig
