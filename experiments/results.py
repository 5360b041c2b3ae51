"""The result row: fixed columns every run writes, whatever the backend.

A run writes ``result.json`` (a list of rows: one per backend; two for backend=both, each
carrying ``error_pct`` = (predicted - measured) / measured x 100 of latency). A multirun
gathers them into ``results.csv`` in its sweep directory. Files are written atomically."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from sim.atomic import atomic_write_text

COLUMNS = [
    "model", "hardware", "policy", "backend", "window", "bundling", "chunk_kib", "memory_budget",
    "sparsity", "tokens", "latency_ms", "io_ms", "mem_ms", "compute_ms", "bytes_per_token",
    "reads_per_token", "gbps", "error_pct",
]
EXTRA_COLUMNS = [
    "study", "resident_mb", "warmup", "measured_tokens", "seed", "reads_in_flight", "predictor", "mem_strategy", "eviction",
    "warm_start", "lookahead", "coalesce_gap", "trace", "new_neurons_per_token", "resident_neurons", "cache_neurons", "wall_s", "config_hash", "run_dir",
]


def make_row(setup, backend: str, summary: dict[str, float], sparsity: float, **extra: Any) -> dict[str, Any]:
    p = setup.policy
    row = {
        "model": setup.spec.name, "hardware": setup.hardware.name, "policy": p.name, "backend": backend,
        "window": p.window, "bundling": p.bundling, "chunk_kib": p.chunk_kib, "memory_budget": p.memory_budget,
        "sparsity": round(float(sparsity), 6), "tokens": setup.tokens, "error_pct": None,
        "warmup": setup.warmup, "seed": setup.seed, "reads_in_flight": p.reads_in_flight,
        "predictor": p.predictor, "mem_strategy": p.mem_strategy, "eviction": p.eviction,
        "warm_start": p.warm_start, "lookahead": p.lookahead, "coalesce_gap": p.coalesce_gap,
        "trace": setup.trace_cfg.get("path") or setup.trace_cfg["kind"], "study": setup.study,
    }
    row.update(summary)
    if "resident_neurons" in summary:  # summed over layers: the FFN cache's size in memory
        row["resident_mb"] = round(summary["resident_neurons"] * setup.spec.neuron_bytes / 1e6, 3)
    row.update(extra)
    return row


def add_error_pct(predicted: dict[str, Any], measured: dict[str, Any]) -> None:
    """Signed relative error of the prediction, written on both rows of a backend=both run."""
    err = (predicted["latency_ms"] - measured["latency_ms"]) / measured["latency_ms"] * 100.0
    predicted["error_pct"] = measured["error_pct"] = round(err, 3)


HASH_IGNORED = ("hydra", "progress", "timeline")  # keys that never change a result


def config_hash(cfg: dict[str, Any]) -> str:
    """A short, stable hash of a run's resolved config (a plain dict), without the keys that only
    change how a run is shown. Two runs with the same hash compute the same rows."""
    data = {k: v for k, v in cfg.items() if k not in HASH_IGNORED}
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_result(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The rows of ``run_dir/result.json``, or None if it is missing or unreadable."""
    path = Path(run_dir) / "result.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) and rows else None


def finished_rows(run_dir: str | Path, hash_: str) -> list[dict[str, Any]] | None:
    """The stored rows if ``run_dir`` already holds a finished run of this exact config, else None."""
    rows = read_result(run_dir)
    if rows and all(r.get("config_hash") == hash_ for r in rows):
        return rows
    return None


def write_result(run_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(run_dir) / "result.json"
    atomic_write_text(path, json.dumps(rows, indent=1, default=float))
    return path


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    for c in COLUMNS + EXTRA_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[COLUMNS + EXTRA_COLUMNS + [c for c in df.columns if c not in COLUMNS + EXTRA_COLUMNS]]


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """Every result.json under ``sweep_dir`` as one table (one row per run and backend)."""
    rows = []
    for p in sorted(Path(sweep_dir).rglob("result.json")):
        try:
            found = json.loads(p.read_text())
        except (OSError, ValueError) as e:  # one damaged run must not hide the others
            warnings.warn(f"skipping unreadable {p}: {e}")
            continue
        for row in found:
            row.setdefault("run_dir", str(p.parent))
            rows.append(row)
    return frame(rows)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    atomic_write_text(path, df.to_csv(index=False))
    return Path(path)


def format_table(df: pd.DataFrame) -> str:
    """A short human table: one line per run, the breakdown, and speed-up over naive where present."""
    cols = ["model", "hardware", "policy", "backend", "latency_ms", "io_ms", "mem_ms", "compute_ms",
            "bytes_per_token", "reads_per_token", "gbps", "error_pct"]
    t = df[cols].copy()
    t["MB/token"] = t.pop("bytes_per_token") / 1e6
    same = ["model", "hardware", "backend", "memory_budget", "sparsity"]  # a fair naive baseline
    naive = df[df["policy"] == "naive"].drop_duplicates(same).set_index(same)["latency_ms"]
    keys = list(df[same].itertuples(index=False, name=None))
    t["vs_naive"] = [naive[k] / lat if k in naive.index else float("nan") for k, lat in zip(keys, df["latency_ms"])]
    for col in ("error_pct", "vs_naive"):
        if t[col].isna().all():
            t = t.drop(columns=col)
    return t.to_string(index=False, float_format=lambda v: f"{v:,.2f}")
