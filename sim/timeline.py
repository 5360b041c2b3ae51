"""The simulator's event timeline: dump it as CSV, draw it as a Gantt chart."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

LANE_ORDER = ["compute", "mem", "flash"]
COLORS = {"attention": "#4c72b0", "predictor": "#8172b2", "ffn_resident": "#55a868", "ffn_new": "#64b5cd",
          "head": "#937860", "evict": "#ccb974", "insert": "#da8bc3", "read": "#c44e52"}


def save_timeline(events, out_dir: str | Path, title: str = "", max_tokens: int = 3) -> tuple[Path, Path]:
    """Write timeline.csv (all events) and timeline.png (the first ``max_tokens`` tokens)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "timeline.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["token", "layer", "lane", "kind", "start", "end"])
        w.writeheader()
        for e in events:
            w.writerow(asdict(e))
    png = out_dir / "timeline.png"
    gantt([e for e in events if e.token < max_tokens], png, title=title)
    return csv_path, png


def gantt(events, path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 2.8))
    for e in events:
        y = LANE_ORDER.index(e.lane)
        ax.barh(y, (e.end - e.start) * 1e3, left=e.start * 1e3, height=0.6,
                color=COLORS.get(e.kind, "#999999"), edgecolor="none")
    ax.set_yticks(range(len(LANE_ORDER)), LANE_ORDER)
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "simulated timeline")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncol=len(COLORS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
