"""Probe: does staging the early blocks in shared memory (Triton's cp.async software pipeline) let a PDL launch
of the batch-1 sparse FFN request more of its share before griddepcontrol.wait than the register-held
`pdl="early"` path, and so reach more of the copy peak at 90-95% sparsity?

The staged kernel is the persistent whole-row loop written plainly and pipelined by the compiler
(`tl.range(..., num_stages=STAGES)`): its prologue issues cp.async copies of the first STAGES-1 blocks of
rows into shared memory before the loop, and the PDL wait sits inside the loop's first iteration, before x is
read, so those copies are in flight while the previous kernel finishes. x is read inside an `if` (first
iteration only), which the pipeliner does not touch: a plain in-loop load of x would be pipelined into the
prologue too, before the wait (seen in the sm_90 PTX; a volatile load is pipelined as well).

    python benchmarks/probes/staged_probe.py --out DIR   # OPT-6.7B shapes, fp16, CUDA-graph replay; prints a table

Each staged config is checked against the library's accumulating launch, and the PDL launch after a late
writer of x (bench_kernels.LateWriter), before it is timed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

from bench_kernels import ROTATE, LateWriter, graph_ms, sparse_ffn_mod  # noqa: E402
from _results import write_outputs  # noqa: E402
from kernel_floor import D, DTYPE, probe_case, probe_setup  # noqa: E402
from real.kernels.sparse_ffn import bundled_sparse_ffn  # noqa: E402

# (BLOCK_R, num_warps, STAGES, programs per SM)
CONFIGS = [(1, 8, 3, 1), (1, 8, 4, 1), (1, 8, 5, 1), (1, 8, 6, 1), (1, 8, 8, 1), (2, 8, 3, 1), (2, 8, 4, 1),
           (2, 16, 3, 1), (2, 16, 4, 1), (1, 16, 6, 1), (1, 4, 4, 1), (1, 8, 3, 2), (1, 8, 4, 2)]


@triton.jit
def _staged_kernel(x_ptr, up_ptr, s_ur, down_ptr, s_dr, bias_ptr, idx_ptr, n_active, acc_ptr, D,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_blk = tl.cdiv(n_active, BLOCK_R)
    start = ((pid * n_blk) // G) * BLOCK_R
    end = tl.minimum((((pid + 1) * n_blk) // G) * BLOCK_R, n_active)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    offs = tl.arange(0, BLOCK_R)
    part = tl.zeros([BLOCK_D], tl.float32)
    x0 = tl.zeros([BLOCK_D], tl.float32)
    for r0 in tl.range(start, end, BLOCK_R, num_stages=STAGES):
        m = r0 + offs < end
        rows = tl.load(idx_ptr + r0 + offs, mask=m, other=0)
        mm = m[:, None] & dmask[None, :]
        u = tl.load(up_ptr + rows[:, None] * s_ur + d[None, :], mask=mm, other=0.0)
        dn = tl.load(down_ptr + rows[:, None] * s_dr + d[None, :], mask=mm, other=0.0)
        b = tl.load(bias_ptr + rows, mask=m, other=0.0).to(tl.float32)
        if r0 == start:     # first iteration: after the prologue's copies are issued
            if PDL:
                gdc_wait()
            x0 = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        z = tl.sum(u.to(tl.float32) * x0[None, :], axis=1) + b
        h = tl.where(m, tl.maximum(z, 0.0), 0.0)
        part += tl.sum(dn.to(tl.float32) * h[:, None], axis=0)
    if start < end:
        tl.atomic_add(acc_ptr + d, part, mask=dmask, sem="relaxed")


def staged(x, cache, idx, bias, acc, cfg, pdl=True):
    block_r, warps, stages, per_sm = cfg
    sms = sparse_ffn_mod._sm_count(x.device)
    n = idx.numel()
    grid = (max(1, min(triton.cdiv(n, block_r), sms * per_sm)),)
    extra = dict(launch_pdl=True) if pdl else {}
    _staged_kernel[grid](x, cache, cache.stride(0), cache[:, D:], cache.stride(0), bias, idx, n, acc, D,
                         BLOCK_R=block_r, BLOCK_D=D, STAGES=stages, PDL=pdl, num_warps=warps, num_stages=stages,
                         **extra)
    return acc


def main() -> int:
    ctx = probe_setup(__doc__)
    dev, date, peak, sms = ctx.dev, ctx.date, ctx.peak, ctx.sms
    caches, bias, xs = ctx.caches, ctx.bias, ctx.xs
    accs = [torch.zeros(1, D, device="cuda") for _ in range(ROTATE)]
    late = LateWriter(sms)
    tol = 2 * torch.finfo(DTYPE).eps
    lines = [f"# staged (cp.async-pipelined) early PDL probe, OPT-6.7B batch 1 fp16: {dev}, {date}",
             f"# CUDA-graph replay of {ROTATE} rotated input sets, median per call; copy peak {peak:.0f} GB/s",
             f"{'sp%':>4} {'contender':<44} {'us':>7} {'%peak':>6}  check"]
    records = []
    for sp in ctx.sparsities:
        n, nbytes, idxs, ref = probe_case(ctx, sp)
        timed = {}
        for label, pdl in (("library, PDL", True), ("library, PDL early", "early")):
            timed[label] = (graph_ms([lambda i=i, p=pdl: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], pdl=p) for i in range(ROTATE)]), "")
        for cfg in CONFIGS:
            for pdl in (True, False):
                acc = torch.zeros(1, D, device="cuda")
                staged(xs[0], caches[0], idxs[0], bias, acc, cfg, pdl)
                rel = float((acc - ref).norm() / ref.norm())
                note = f"rel {rel:.1e}"
                if pdl:             # after a late writer of x: a read of x before the wait would see zeros
                    xp = torch.empty_like(xs[0])
                    acc.zero_()
                    late.run(xs[0], xp, lambda: staged(xp, caches[0], idxs[0], bias, acc, cfg, True))
                    rel_late = float((acc - ref).norm() / ref.norm())
                    note += f", after late writer {rel_late:.1e}"
                    rel = max(rel, rel_late)
                if rel > tol:
                    raise SystemExit(f"staged {cfg} pdl={pdl} at {sp}%: relative error {rel:.2e} > {tol:.1e}")
                label = f"staged R{cfg[0]} w{cfg[1]} S{cfg[2]} {cfg[3]}/SM{' PDL' if pdl else ''}"
                timed[label] = (graph_ms([lambda i=i, c=cfg, p=pdl: staged(
                    xs[i], caches[i % 4], idxs[i], bias, accs[i], c, p) for i in range(ROTATE)]), note)
        for label, (ms, note) in timed.items():
            pct = 100 * nbytes / ms / 1e6 / peak
            lines.append(f"{sp:>4} {label:<44} {ms * 1e3:7.2f} {pct:5.1f}%  {note}")
            records.append({"device": dev, "date": date, "sparsity": sp, "case": label, "ms": round(ms, 5),
                            "bytes": nbytes, "pct_of_copy_peak": round(pct, 1), "peak_gbps": round(peak, 1)})
        print("\n".join(lines[-len(timed):]), flush=True)
    write_outputs(ctx.out, "staged_probe", lines, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
