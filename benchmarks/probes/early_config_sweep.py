"""Sweep of the block sizes for the sparse FFN's pdl='early' launch, at OPT-6.7B's and Llama-2-7B's shapes.

`early_config` fixes them (the autotuner times one launch alone and cannot rank launches whose point is to
overlap the previous one); it was picked from a sweep at OPT-6.7B's shapes only. This times every
persistent-kernel config whose double-buffered tiles fit the register budget (BLOCK_R 1/2/4 x 4/8/16 warps
x 1/2 programs per SM) as an accumulating pdl='early' launch, exactly as bench_kernels.py times the library
(CUDA-graph replay of 16 rotated input sets, median per call), beside the library's own pick, and checks each
config's sum against float64 first. Batch 1, fp16.

    python benchmarks/probes/early_config_sweep.py [--out benchmarks/probes] [--sparsities 90,95,97,99] [--models ...]

Writes DIR/results/early_config_sweep.txt and DIR/results/early_config_sweep.json (one flat record per model,
sparsity and config)."""

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

from bench_kernels import (CACHE_COPIES, DTYPE, MODELS, ROTATE, ffn_bytes, graph_ms, peak_copy_gbps,  # noqa: E402
                           rel_err, sparse_ffn_mod, tolerance)
from _results import write_outputs  # noqa: E402
from real.kernels.sparse_ffn import bundled_sparse_ffn, sparse_ffn_reference, split_bundles  # noqa: E402

SPARSITIES = (90, 95, 97, 99)
BLOCK_RS, WARPS, PROGS = (1, 2, 4), (4, 8, 16), (1, 2)


def candidates(d_model: int, gated: bool) -> list[dict]:
    """Every config of the sweep whose two blocks in flight fit the register budget."""
    k, block_d = (3 if gated else 2), sparse_ffn_mod.next_pow2(d_model)
    return [{"BLOCK_R": r, "BLOCK_D": block_d, "N_ACC": 1, "PROGS_PER_SM": p, "num_warps": w, "num_stages": 1}
            for r in BLOCK_RS for w in WARPS for p in PROGS if sparse_ffn_mod._tiles_fit(k, r, block_d, w)]


def label(cfg: dict) -> str:
    return f"{cfg['BLOCK_R']} rows x {cfg['num_warps']} warps x {cfg['PROGS_PER_SM']}/SM"


def sweep_model(model: str, sparsities, peak: float, sms: int, stamp: dict, lines: list, records: list) -> None:
    D, FF, gated, has_bias = MODELS[model]
    k = 3 if gated else 2
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [(torch.randn(FF, k * D, device="cuda", generator=g) / D ** 0.5).to(DTYPE) for _ in range(CACHE_COPIES)]
    bias = (0.1 * torch.randn(FF, device="cuda", generator=g)).to(DTYPE) if has_bias else None
    xs = [torch.randn(1, D, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
    gt64, up64, dn64 = split_bundles(caches[0].double(), D, gated)
    cands = candidates(D, gated)
    for sp in sparsities:
        n = round(FF * (1 - sp / 100))
        idxs = [torch.sort(torch.randperm(FF, device="cuda", generator=g)[:n]).values.to(torch.int32)
                for _ in range(ROTATE)]
        ref = sparse_ffn_reference(xs[0].double(), up64, dn64, idxs[0], gate=gt64,
                                   bias=None if bias is None else bias.double())
        nbytes = ffn_bytes(n, D, k, has_bias, accumulate=True)
        accs = [torch.zeros(1, D, device="cuda") for _ in range(ROTATE)]
        lib = sparse_ffn_mod.early_pick(n, sms, D, gated, indexed=True)   # None: the library takes the tuned config
        lines.append(f"\n## {model} {sp}%: {n} rows, {nbytes / 1e6:.1f} MB; the library's pick: "
                     f"{label(lib) if lib else 'tuned (share > EARLY_CONFIG_MAX_SHARE)'}")
        rows = []
        for cfg in [None] + cands:
            def call(i, cfg=cfg):
                return lambda: bundled_sparse_ffn(xs[i], caches[i % CACHE_COPIES], idxs[i], gated=gated, bias=bias,
                                                  accumulate=accs[i], pdl="early", config=cfg)
            acc = torch.zeros(1, D, device="cuda")
            bundled_sparse_ffn(xs[0], caches[0], idxs[0], gated=gated, bias=bias, accumulate=acc, pdl="early",
                               config=cfg)
            err, tol = rel_err(acc, ref), tolerance(torch.float32, max(D, n))
            if not (err <= tol):
                raise SystemExit(f"{model} {sp}% {label(cfg) if cfg else 'library'}: relative error {err:.2e} > "
                                 f"{tol:.2e} against float64")
            ms = graph_ms([call(i) for i in range(ROTATE)])
            rows.append((cfg, ms))
        lib_ms = rows[0][1]
        best_cfg, best_ms = min(rows[1:], key=lambda r: r[1])
        for cfg, ms in rows:
            name = "library (pdl='early', config=None)" if cfg is None else label(cfg)
            mark = "  <- best" if cfg is best_cfg else ""
            lines.append(f"{name:<36} {ms * 1e3:7.2f} us  {100 * nbytes / ms / 1e6 / peak:5.1f}% of peak  "
                         f"x{ms / lib_ms:5.2f} the library{mark}")
            records.append({**stamp, "model": model, "batch": 1, "sparsity": sp, "rows": n, "bytes": nbytes,
                            "config": "library" if cfg is None else label(cfg),
                            # the library's own pick where it takes early_config (None: the tuned config)
                            **{key: (cfg or lib or {}).get(name) for key, name in
                               (("block_r", "BLOCK_R"), ("num_warps", "num_warps"),
                                ("progs_per_sm", "PROGS_PER_SM"))},
                            "ms": round(ms, 5), "library_ms": round(lib_ms, 5), "peak_gbps": round(peak, 1),
                            "touched_gbps": round(nbytes / ms / 1e6, 1)})
        print("\n".join(lines[-len(rows) - 1:]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "probes"))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)),
                    help="comma-separated percentages of inactive rows (default: %(default)s)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("early_config_sweep.py times CUDA launches: run it on a machine with an NVIDIA GPU")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}. Fix: pick from {','.join(MODELS)}")
    stamp = {"device": torch.cuda.get_device_name(),
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    peak = peak_copy_gbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"# pdl='early' block sizes, batch 1 fp16, accumulating: {stamp['device']}, {stamp['date']}",
             f"# CUDA-graph replay of {ROTATE} rotated calls, median per call; copy peak {peak:.0f} GB/s; {sms} SMs"]
    records: list = []
    for model in models:
        sweep_model(model, [int(v) for v in args.sparsities.split(",")], peak, sms, stamp, lines, records)
    write_outputs(args.out, "early_config_sweep", lines, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
