"""Repro attempt for the one mismatch seen with copies of the FFN's sum (atomic_spread_probe_mismatch_h200.log,
2026-12-02 ~18:30 UTC): on a fresh machine, the first consuming pair with 2 copies at 99% differed from the
one-sum pair by 1.6e-2. This runs the probe's library section's first calls in this process exactly in that
order (per copies 1, 2, 4: a pdl='early' FFN into zeroed copies, then add_layer_norm(consume=True, pdl=True),
the first call of each copies count autotuning the norm; then the three graph timings), checking every first
pair, and repeats it --rounds times with new buffers. Run it in fresh processes with an empty
TRITON_CACHE_DIR to reproduce the cold start.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probes/copies_repro.py --rounds 3"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402

from bench_kernels import ROTATE, graph_ms  # noqa: E402
from atomic_spread_probe import first_pair_error, library_pair  # noqa: E402
from kernel_floor import D, DTYPE, FF, active_sets, opt_inputs  # noqa: E402
from real.kernels.add_norm import add_layer_norm  # noqa: E402
from real.kernels.sparse_ffn import bundled_sparse_ffn  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=int, default=99)
    ap.add_argument("--no-graphs", action="store_true", help="skip the graph timings between copies counts")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    caches, bias, xs = opt_inputs(g)
    w, b = (torch.randn(D, device="cuda", generator=g).to(DTYPE) for _ in range(2))
    rs = [torch.randn(1, D, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
    n = round(FF * (1 - args.sparsity / 100))
    tol = 2 * torch.finfo(DTYPE).eps
    failures = 0
    for rnd in range(args.rounds):
        idxs = active_sets(g, n)
        one = torch.zeros(1, D, device="cuda")
        bundled_sparse_ffn(xs[0], caches[0], idxs[0], bias=bias, accumulate=one)
        ref_out, _ = add_layer_norm(one, rs[0], w, b, consume=True)
        for copies in (1, 2, 4):
            accs, ffn, norm = library_pair(xs, caches, idxs, bias, rs, w, b, copies)
            rel = first_pair_error(ffn, norm, ref_out)
            left = sum(int(a.count_nonzero()) for a in accs)
            bad = rel > tol or left
            failures += bool(bad)
            print(f"round {rnd} copies {copies}: first pair vs one-sum pair {rel:.2e}, non-zero left {left}"
                  f"{'  MISMATCH' if bad else ''}", flush=True)
            if not args.no_graphs:
                for calls in ([lambda i=i: ffn(i) for i in range(ROTATE)], [lambda i=i: norm(i) for i in range(ROTATE)],
                              [lambda i=i: (ffn(i), norm(i)) for i in range(ROTATE)]):
                    graph_ms(calls)
    print(f"{failures} mismatches in {3 * args.rounds} first pairs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
