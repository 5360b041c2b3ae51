"""Probe: how much of the batch-1 sparse FFN's time is its final reduction? Every program of the persistent
kernel adds its fp32 share of y (d_model floats) into one accumulator with atomics, all at about the same
time at the end; with N_ACC copies (program p adds into copy p % N_ACC) the same atomics spread over N_ACC
times the L2 lines. N_ACC = the grid (each program its own copy) is the no-contention bound.

    python benchmarks/probes/atomic_spread_probe.py --out DIR     # OPT-6.7B shapes, fp16, CUDA-graph replay

The launch is the library's accumulating `pdl="early"` launch (early_config's block sizes), made directly so
that N_ACC may be any number of copies (the library's accumulate= takes [copies, ...] since this probe); each
N_ACC is checked (sum of the copies against the library's result) before it is timed; 'PDL' rows use
pdl=True's wait-first launch for comparison.

The copies cost the consumer: the next add+norm (consume=True) reads and zeroes every copy. The second table
times, through the library (sparse_ffn(accumulate=[copies, 1, D]) and add_layer_norm(consume=True)), the FFN
alone, the add+norm alone and the pair, all PDL (the FFN pdl='early'), for 1, 2 and 4 copies."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402
import triton  # noqa: E402

from bench_kernels import ROTATE, graph_ms, sparse_ffn_mod  # noqa: E402
from _results import write_outputs  # noqa: E402
from kernel_floor import D, DTYPE, probe_case, probe_setup  # noqa: E402
from real.kernels.add_norm import add_layer_norm  # noqa: E402
from real.kernels.sparse_ffn import bundled_sparse_ffn  # noqa: E402


def launch(x, cache, idx, bias, acc, n_acc: int, cfg: dict, pdl: int):
    """The persistent kernel, accumulating (FINISH=False) into acc [n_acc, D], with an index and the count
    from the host, as sparse_ffn(accumulate=..., pdl=...) launches it but with n_acc copies."""
    sms = sparse_ffn_mod._sm_count(x.device)
    n = idx.numel()
    grid = (max(1, min(triton.cdiv(n, cfg["BLOCK_R"]), sms * cfg["PROGS_PER_SM"])),)
    up, down = cache[:, :D], cache[:, D:]
    meta = {k: v for k, v in cfg.items() if k != "N_ACC"}
    sparse_ffn_mod._stream_kernel[grid](
        x, x.stride(0), up, up.stride(0), up.stride(1), up, up.stride(0), up.stride(1), down, down.stride(0),
        down.stride(1), bias, x, idx, x, n, acc, x, acc, D, 1, D, triton.next_power_of_2(n),
        HAS_IDX=True, COUNT_ON_DEVICE=False, HAS_BIAS=True, HAS_OUT_BIAS=False, GATED=False, ACT=0, BLOCK_T=1,
        BLOCK_E=4096, N_ACC=n_acc, FENCE=True, FINISH=False, PDL=pdl, launch_pdl=True, **meta)
    return acc


def library_pair(xs, caches, idxs, bias, rs, w, b, copies: int):
    """Through the library, per rotated input set i: ffn(i) adds the FFN (pdl='early') into sums accs[i] of
    `copies` copies [copies, 1, D], norm(i) consumes them in add_layer_norm (pdl=True). Returns (accs, ffn, norm)."""
    accs = [torch.zeros(copies, 1, D, device="cuda") for _ in range(ROTATE)]

    def ffn(i):
        return bundled_sparse_ffn(xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], pdl="early")

    def norm(i):
        return add_layer_norm(accs[i], rs[i], w, b, consume=True, pdl=True)

    return accs, ffn, norm


def first_pair_error(ffn, norm, ref_out) -> float:
    """Relative error of the first FFN + add+norm pair (input set 0) against ref_out (the one-sum pair)."""
    ffn(0)
    out, _ = norm(0)
    return float((out.float() - ref_out.float()).norm() / ref_out.float().norm())


def main() -> int:
    ctx = probe_setup(__doc__)
    dev, date, peak, sms, g = ctx.dev, ctx.date, ctx.peak, ctx.sms, ctx.g
    caches, bias, xs = ctx.caches, ctx.bias, ctx.xs
    tol = 2 * torch.finfo(DTYPE).eps
    lines = [f"# atomic-spread probe, OPT-6.7B batch 1 fp16, accumulating launch: {dev}, {date}",
             f"# CUDA-graph replay of {ROTATE} rotated input sets, median per call; copy peak {peak:.0f} GB/s",
             f"{'sp%':>4} {'launch':<10} {'N_ACC':>5} {'us':>7} {'%peak':>6}  check"]
    records = []
    for sp in ctx.sparsities:
        n, nbytes, idxs, ref = probe_case(ctx, sp)
        cfg = sparse_ffn_mod.early_config(n, sms, D, False)
        grid = min(triton.cdiv(n, cfg["BLOCK_R"]), sms)
        for pdl, name in ((2, "PDL early"), (1, "PDL")):
            for n_acc in sorted({1, 2, 4, 8, 16, grid}):
                acc = torch.zeros(n_acc, D, device="cuda")
                launch(xs[0], caches[0], idxs[0], bias, acc, n_acc, cfg, pdl)
                rel = float((acc.sum(0, keepdim=True) - ref).norm() / ref.norm())
                if rel > tol:
                    raise SystemExit(f"N_ACC={n_acc} {name} at {sp}%: relative error {rel:.2e} > {tol:.1e}")
                accs = [torch.zeros(n_acc, D, device="cuda") for _ in range(ROTATE)]
                ms = graph_ms([lambda i=i, a=n_acc: launch(xs[i], caches[i % 4], idxs[i], bias, accs[i], a, cfg,
                                                           pdl) for i in range(ROTATE)])
                pct = 100 * nbytes / ms / 1e6 / peak
                lines.append(f"{sp:>4} {name:<10} {n_acc:>5} {ms * 1e3:7.2f} {pct:5.1f}%  rel {rel:.1e}")
                print(lines[-1], flush=True)
                records.append({"device": dev, "date": date, "sparsity": sp, "case": f"{name}, N_ACC={n_acc}",
                                "n_acc": n_acc, "ms": round(ms, 5), "bytes": nbytes,
                                "pct_of_copy_peak": round(pct, 1), "peak_gbps": round(peak, 1),
                                "config": {k: cfg[k] for k in ("BLOCK_R", "num_warps")}})
    lines += ["", "# through the library, all PDL (FFN pdl='early', add_layer_norm pdl=True, consume=True)",
              f"{'sp%':>4} {'copies':>6} {'FFN us':>7} {'%peak':>6} {'norm us':>7} {'pair us':>7}  check"]
    w, b = (torch.randn(D, device="cuda", generator=g).to(DTYPE) for _ in range(2))
    rs = [torch.randn(1, D, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
    for sp in ctx.sparsities:
        n, nbytes, idxs, one = probe_case(ctx, sp)
        ref_out, _ = add_layer_norm(one, rs[0], w, b, consume=True)
        for copies in (1, 2, 4):
            accs, ffn, norm = library_pair(xs, caches, idxs, bias, rs, w, b, copies)
            rel = first_pair_error(ffn, norm, ref_out)
            if rel > tol or any(a.any() for a in accs):
                raise SystemExit(f"{copies} copies at {sp}%: pair differs by {rel:.2e} or left a sum non-zero")
            ffn_ms = graph_ms([lambda i=i: ffn(i) for i in range(ROTATE)])
            norm_ms = graph_ms([lambda i=i: norm(i) for i in range(ROTATE)])
            pair_ms = graph_ms([lambda i=i: (ffn(i), norm(i)) for i in range(ROTATE)])
            pct = 100 * nbytes / ffn_ms / 1e6 / peak
            lines.append(f"{sp:>4} {copies:>6} {ffn_ms * 1e3:7.2f} {pct:5.1f}% {norm_ms * 1e3:7.2f} "
                         f"{pair_ms * 1e3:7.2f}  pair vs one-sum pair {rel:.1e}")
            print(lines[-1], flush=True)
            records.append({"device": dev, "date": date, "sparsity": sp, "case": f"library pair, {copies} copies",
                            "n_acc": copies, "ms": round(ffn_ms, 5), "norm_ms": round(norm_ms, 5),
                            "pair_ms": round(pair_ms, 5), "bytes": nbytes, "pct_of_copy_peak": round(pct, 1),
                            "peak_gbps": round(peak, 1)})
    write_outputs(ctx.out, "atomic_spread_probe", lines, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
