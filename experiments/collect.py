"""``python -m experiments.collect SWEEP_DIR...``: (re)write each sweep's results.csv from the
result.json files its runs left, without running anything (e.g. after a sweep was killed)."""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.results import collect, format_table, write_csv


def main(argv: list[str] | None = None) -> int:
    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        print(__doc__, file=sys.stderr)
        return 2
    status = 0
    for d in map(Path, dirs):
        df = collect(d)
        if df.empty:
            print(f"{d}: no result.json found", file=sys.stderr)
            status = 1
            continue
        print(format_table(df))
        print(f"results: {write_csv(df, d / 'results.csv')} ({len(df)} rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())
