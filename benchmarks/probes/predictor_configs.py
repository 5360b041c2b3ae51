"""Every block-size config of the predictor's two kernels, timed plainly and with PDL, batch 1 and 8.

    python benchmarks/probes/predictor_configs.py [--out benchmarks/probes]

Why: with pdl=True the predictor at batch 8 took 7.2-7.7 us in three processes and 11.6 us in a fourth
(H200, 2026-12-02 13:26 UTC, kernels_h200_run10_predictor.log, in git history), while the plain launch stayed at
10.5-11.0 us. The configs come from the autotuner, which times one launch alone (no PDL overlap) and may pick
differently per process; this times each (lowrank, select) config pair the way bench_kernels.py times the
predictor (CUDA-graph replay of 16 rotated input sets, back to back), to see which pairs PDL suits.
Writes results/predictor_configs.txt and results/predictor_configs.json under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402

from bench_kernels import DTYPE, MODELS, PREDICTOR_THRESHOLD, ROTATE, graph_ms, predictor_weights  # noqa: E402
from real.kernels import predictor as pred  # noqa: E402
from _results import write_outputs  # noqa: E402

D = MODELS["opt-6.7b"][0]     # the inputs of bench_kernels.bench_predictor


def as_dict(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "probes"))
    args = ap.parse_args()
    stamp = {"device": torch.cuda.get_device_name(),
             "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    As, Bs = predictor_weights()
    records, lines = [], [f"# predictor config pairs, OPT-6.7B rank {As[0].shape[1]}: {stamp['device']}, {stamp['date']}",
                          "# CUDA-graph replay of 16 rotated input sets, median per call (us); split_k auto"]
    for T in (1, 8):
        mode = "one" if T == 1 else "dot"
        xs = [torch.randn(T, D, device="cuda", dtype=DTYPE) for _ in range(ROTATE)]
        want = set(pred.active_list(*pred.predict_active(xs[0], As[0], Bs[0], PREDICTOR_THRESHOLD)).tolist())
        for lc in pred.LOWRANK.configs[mode]:
            for sc in pred.SELECT.configs[mode]:
                config = {"lowrank": as_dict(lc), "select": as_dict(sc)}
                row = {}
                for pdl in (False, True):
                    calls = [(lambda x=x, A=A, B=B: pred.predict_active(x, A, B, PREDICTOR_THRESHOLD,
                                                                        config=config, pdl=pdl))
                             for x, A, B in zip(xs, As, Bs)]
                    try:
                        got = set(pred.active_list(*calls[0]()).tolist())
                        row[pdl] = graph_ms(calls) if len(got ^ want) <= 2 else float("nan")
                    except Exception as e:  # noqa: BLE001 - a config that does not compile for this shape
                        row[pdl] = float("nan")
                        print(f"T={T} {config}: {type(e).__name__}", flush=True)
                records.append(dict(device=stamp["device"], date=stamp["date"], batch=T,
                                    lowrank=str(as_dict(lc)), select=str(as_dict(sc)),
                                    plain_ms=row[False], pdl_ms=row[True]))
                print(f"T={T} plain {row[False] * 1e3:6.2f} PDL {row[True] * 1e3:6.2f}  {config}", flush=True)
    for T in (1, 8):
        lines.append(f"\n## batch {T}, fastest with PDL first: plain us, PDL us, lowrank config, select config")
        rows = sorted((r for r in records if r["batch"] == T), key=lambda r: (r["pdl_ms"] != r["pdl_ms"], r["pdl_ms"]))
        lines += [f"{r['plain_ms'] * 1e3:6.2f} {r['pdl_ms'] * 1e3:6.2f}  {r['lowrank']}  {r['select']}" for r in rows]
    write_outputs(args.out, "predictor_configs", lines, records)


if __name__ == "__main__":
    main()
