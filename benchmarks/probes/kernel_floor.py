"""What a single launch can reach at the sparse FFN's sizes: the fixed cost of a launch and the share of the
copy peak that a plain copy or read of the same bytes gets, timed exactly as bench_kernels.py times the kernel.

    python benchmarks/probes/kernel_floor.py [--out benchmarks/probes]

Issue 5 asks for >= 70% of the copy peak (a 1 GiB device-to-device copy) on the bytes the sparse FFN touches
at 90-95% sparsity, where those bytes are 13-27 MB (OPT-6.7B). At such sizes a launch's fixed cost (start,
first loads, drain) is a visible share of the time for any kernel, a plain copy included. Per size this
measures, CUDA-graph replay of 16 rotated input sets (no L2 hits), median per call: a torch copy that
touches the same bytes (half read, half written, the peak's convention), a torch sum that reads them, the
fastest of a few configs of a plain Triton streaming read of them (contiguous, no index, no reduction across
programs: what any single launch that reads those bytes pays at least), our
fused kernel, the same kernel accumulating into a caller's fp32 buffer (``accumulate=``: no epilogue, the
next op would read and reset the sum), and floors: an empty Triton kernel (1 and #SMs programs) and our
kernel with 0 active rows (count on the device), both ways. And the same with programmatic dependent launch
(PDL: a launch may start while the previous kernel finishes; its programs wait for it before reading), which
hides launch latency between dependent kernels: the read, waiting before it reads (as any kernel whose input
the previous kernel wrote must) or only before its store (inputs no earlier kernel writes), our kernel both
ways, and the all-resident-rows form (idx=None over a cache of just the touched rows, no index) accumulating
without PDL, with it, and with pdl='early' (the first two blocks of weights requested before the wait), and
the indexed form accumulating with pdl='early'. Before
timing, the accumulating and PDL launches are checked against the plain finishing one (PDL ones right after a
kernel that writes their x late, with a negative control that shows whether the early start happened); at 90
and 95% every persistent-kernel config (and a few with 16 warps) is timed accumulating, and indexed and
all-rows with pdl='early'. Writes
results/kernel_floor.txt and results/kernel_floor.json under --out."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

from bench_kernels import (COPY_WAYS, ROTATE, LateWriter, _copy_kernel, ffn_bytes, graph_ms,  # noqa: E402
                           peak_copy_gbps, sparse_ffn_mod)
from real.kernels.sparse_ffn import bundled_sparse_ffn  # noqa: E402
from _results import write_outputs  # noqa: E402  (the probes' shared writer)

D, FF = 4096, 16384            # OPT-6.7B
SPARSITIES = (90, 95, 97, 99)
DTYPE = torch.float16


def opt_inputs(g):
    """The floor's inputs at OPT-6.7B's shapes, fp16: 4 bundled caches [FF, 2 D] (4 x 256 MiB: rotated calls
    find no rows in L2), one up bias [FF], and ROTATE tokens x [1, D]."""
    caches = [(torch.randn(FF, 2 * D, device="cuda", generator=g) / D ** 0.5).to(DTYPE) for _ in range(4)]
    bias = (0.1 * torch.randn(FF, device="cuda", generator=g)).to(DTYPE)
    xs = [torch.randn(1, D, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
    return caches, bias, xs


def active_sets(g, n: int) -> list:
    """ROTATE sorted int32 sets of n random active rows out of FF."""
    return [torch.sort(torch.randperm(FF, device="cuda", generator=g)[:n]).values.to(torch.int32)
            for _ in range(ROTATE)]


def probe_setup(doc: str) -> SimpleNamespace:
    """What this floor and the OPT-6.7B probes (staged_probe.py, atomic_spread_probe.py) share: their command
    line (--out, --sparsities), device, date, copy peak and SM count, and a seeded generator with opt_inputs
    drawn from it."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "probes"))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)),
                    help="comma-separated percentages of inactive rows (default: %(default)s)")
    args = ap.parse_args()
    ctx = SimpleNamespace(out=args.out, sparsities=[int(v) for v in args.sparsities.split(",")],
                          dev=torch.cuda.get_device_name(),
                          date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), peak=peak_copy_gbps(),
                          sms=torch.cuda.get_device_properties(0).multi_processor_count,
                          g=torch.Generator(device="cuda").manual_seed(0))
    ctx.caches, ctx.bias, ctx.xs = opt_inputs(ctx.g)
    return ctx


def probe_case(ctx, sp: int):
    """One sparsity of a probe: (n active rows, touched bytes, ROTATE active sets, the library's accumulated
    y of input set 0 as the reference [1, D] fp32)."""
    n = round(FF * (1 - sp / 100))
    idxs = active_sets(ctx.g, n)
    ref = torch.zeros(1, D, device="cuda")
    bundled_sparse_ffn(ctx.xs[0], ctx.caches[0], idxs[0], bias=ctx.bias, accumulate=ref)
    return n, touched_bytes(n), idxs, ref


@triton.jit
def _empty(ptr, PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def read_share(src_ptr, start, end, BLOCK: tl.constexpr):
    """src[start:end] read BLOCK elements at a time, summed per lane in fp32 ([BLOCK]; the caller reduces)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for o in range(start, end, BLOCK):
        offs = o + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _read_stream(src_ptr, out_ptr, n, per_prog, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    """The least a single launch that must read n contiguous elements can do: each program streams its
    contiguous share BLOCK elements at a time (no index, no cross-program reduction) and writes one float.
    PDL (launched with programmatic dependent launch) 1: let the next kernel launch, then wait for the previous
    one before reading (as a kernel whose inputs the previous kernel wrote must); 2: wait only before the
    store (inputs that no earlier kernel writes, e.g. weights: the read overlaps the previous kernel)."""
    if PDL > 0:
        gdc_launch_dependents()
    if PDL == 1:
        gdc_wait()
    pid = tl.program_id(0)
    start = pid * per_prog
    acc = read_share(src_ptr, start, tl.minimum(start + per_prog, n), BLOCK)
    if PDL == 2:
        gdc_wait()
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


READ_CASE = "Triton streaming read (fastest config)"
READ_CASE_PDL = "the same, PDL, waits before reading"
READ_CASE_PDL_EARLY = "the same, PDL, reads before the wait"
READ_CONFIGS = [(block, per_sm, warps) for block in (4096, 8192, 16384) for per_sm in (1, 2, 4) for warps in (4, 8)]


def best_read_ms(srcs, sms, pdl: int = 0) -> tuple[float, str]:
    """Fastest of READ_CONFIGS for a streaming read of each of `srcs` (the same element count): the floor of
    any one-launch kernel that reads those bytes; checked against an exact count. pdl: _read_stream's PDL."""
    launch = dict(PDL=pdl, launch_pdl=pdl > 0)
    n = srcs[0].numel()
    out = torch.empty(sms * 4, device="cuda")
    ones = torch.ones_like(srcs[0])
    best = (float("inf"), "")
    for block, per_sm, warps in READ_CONFIGS:
        progs = sms * per_sm
        per = triton.cdiv(triton.cdiv(n, progs), block) * block
        grid = (triton.cdiv(n, per),)
        _read_stream[grid](ones, out, n, per, BLOCK=block, num_warps=warps, **launch)  # exact: sums < 2^24
        if float(out[:grid[0]].double().sum()) != n:
            raise SystemExit(f"streaming read kernel ({block}, {per_sm}/SM) missed elements: "
                             f"{float(out[:grid[0]].sum())} of {n}")
        ms = graph_ms([lambda i=i: _read_stream[grid](srcs[i], out, n, per, BLOCK=block, num_warps=warps,
                                                      **launch) for i in range(len(srcs))])
        best = min(best, (ms, f"BLOCK={block} {per_sm}/SM w{warps}"))
    return best


# beyond the autotuner's list: 16 warps halve the registers per thread that the two blocks in flight take;
# 4 warps leave room for a second program on the SM (a PDL launch's programs can start beside the last ones)
EXTRA_CONFIGS = [dict(BLOCK_R=r, BLOCK_D=D, PROGS_PER_SM=p, num_warps=w)
                 for r, p, w in ((4, 1, 16), (2, 1, 4), (1, 1, 4), (2, 2, 4), (1, 1, 8))]
# register caps (ptxas maxnreg) that leave half of the SM's 64K registers free, so that the programs of the
# next (PDL) launch can be resident beside this launch's and request their early blocks while it streams
# (sm_90 compile of the early launch, OPT shapes: 2x16 uses 80 registers uncapped, 64 capped with 8 bytes of
# spill; 4x16 110 -> 64; 4x8 222 -> 128; 2x8 128 and 1x8 83 fit uncapped)
EXTRA_CONFIGS += [dict(BLOCK_R=r, BLOCK_D=D, PROGS_PER_SM=1, num_warps=w, maxnreg=m)
                  for r, w, m in ((2, 16, 64), (4, 16, 64), (4, 8, 128), (1, 16, 64))]


def accumulate_sweep(call, sp, label="accumulate") -> list[str]:
    """Every persistent-kernel config (the autotuner's and EXTRA_CONFIGS) on an accumulating launch
    (diagnostic: which grid the fused form likes); call(i, config) launches rotated input set i with it."""
    out = []
    cfgs = [dict(c.kwargs, num_warps=c.num_warps) for c in sparse_ffn_mod.STREAM.configs["one_acc"]] + EXTRA_CONFIGS
    for c in cfgs:
        if c["BLOCK_D"] != D:
            continue
        cfg = dict(c, N_ACC=1, num_stages=1)
        ms = graph_ms([lambda i=i: call(i, cfg) for i in range(ROTATE)])
        cap = f" maxnreg={c['maxnreg']}" if "maxnreg" in c else ""
        out.append(f"#   {sp}% {label} BLOCK_R={c['BLOCK_R']} PROGS_PER_SM={c['PROGS_PER_SM']} "
                   f"w{c['num_warps']}{cap}: {ms * 1e3:.2f} us")
    return out


def check_pdl(x, cache, idx, bias, sp, sms, modes=(True,), label="indexed") -> str:
    """Each PDL launch (finishing and accumulating, per mode) returns what the plain launch does (fp32 atomic
    order apart) when it runs right after a kernel that lets it start at once and writes its x ~20 us later: a
    launch that read x before its wait would compute with x = 0. The GPU is kept ~0.5 ms ahead of the host (a
    queue of large reads) and every launch is warmed up first, so the PDL launch is queued before the late writer
    runs. Negative control: a PDL copy of x that does not wait, in the same sequence, must see the old x (zeros);
    if it does not, the early start did not happen and the check says so."""
    y = bundled_sparse_ffn(x, cache, idx, bias=bias).float()
    tol = 2 * torch.finfo(DTYPE).eps
    late = LateWriter(sms)
    xp = torch.empty_like(x)
    stale = late.early_start_observed(x, xp)
    rels = []
    for mode in modes:
        for accumulate in (False, True):
            acc = torch.zeros(1, D, device="cuda") if accumulate else None
            bundled_sparse_ffn(x, cache, idx, bias=bias, pdl=mode, accumulate=acc)    # warm-up: tuning, JIT
            if acc is not None:
                acc.zero_()
            got = late.run(x, xp, lambda: bundled_sparse_ffn(xp, cache, idx, bias=bias, pdl=mode,
                                                             accumulate=acc)).float()
            rels.append(float((got - y).norm() / y.norm()))
    if max(rels) > tol:
        raise SystemExit(f"a PDL launch disagrees with the plain one at {sp}% (modes {modes}, finishing and "
                         f"accumulating each): relative differences {rels}")
    control = ("read the old x: the early start happened" if stale else
               "read the new x: the early start was NOT observed, so this check is inconclusive")
    return (f"# {sp}% {label}: PDL {'/'.join(map(str, modes))} vs plain launch, after a late writer of x: relative "
            f"differences {' '.join(f'{r:.1e}' for r in rels)} (tolerance {tol:.1e}); negative control (a PDL "
            f"copy without the wait) {control}")


def touched_bytes(n: int, index: bool = True) -> int:
    """The sparse FFN's bytes at OPT-6.7B's shapes, as bench_kernels.py counts them (rows, index, bias, x, y)."""
    return ffn_bytes(n, D, 2, True, index=index)


def check_accumulate(x, cache, idx, bias, sp) -> str:
    """The accumulating launch adds the same y as the finishing launch returns (fp16 rounding apart)."""
    acc = torch.zeros(1, D, device="cuda")
    bundled_sparse_ffn(x, cache, idx, bias=bias, accumulate=acc)
    y = bundled_sparse_ffn(x, cache, idx, bias=bias).float()
    rel = float((acc - y).norm() / y.norm())
    tol = 2 * torch.finfo(DTYPE).eps
    if rel > tol:
        raise SystemExit(f"accumulate mode disagrees with the finishing kernel at {sp}%: {rel:.2e}")
    return f"# {sp}%: accumulating vs finishing launch, relative difference {rel:.1e} (tolerance {tol:.1e})"


def main() -> int:
    ctx = probe_setup(__doc__)
    dev_name, date, peak, sms, g = ctx.dev, ctx.date, ctx.peak, ctx.sms, ctx.g
    caches, bias, xs = ctx.caches, ctx.bias, ctx.xs
    dummy = torch.zeros(1, device="cuda")
    floors = {
        "empty Triton kernel, 1 program": graph_ms([lambda: _empty[(1,)](dummy)] * ROTATE),
        f"empty Triton kernel, {sms} programs": graph_ms([lambda: _empty[(sms,)](dummy)] * ROTATE),
        "the same, PDL": graph_ms([lambda: _empty[(sms,)](dummy, PDL=True, launch_pdl=True)] * ROTATE),
    }
    idx0 = torch.arange(1024, device="cuda", dtype=torch.int32)
    zero = torch.zeros(1, device="cuda", dtype=torch.int32)
    floors["our kernel, 0 active rows (count on device)"] = graph_ms(
        [lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idx0, bias=bias, count=zero) for i in range(ROTATE)])
    accs = [torch.zeros(1, D, device="cuda") for _ in range(ROTATE)]
    floors["the same, accumulating (no epilogue)"] = graph_ms(
        [lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idx0, bias=bias, count=zero, accumulate=accs[i])
         for i in range(ROTATE)])
    floors["the same, accumulating, PDL"] = graph_ms(
        [lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idx0, bias=bias, count=zero, accumulate=accs[i],
                                        pdl=True) for i in range(ROTATE)])
    records, lines = [], []
    lines.append(f"# single-launch floor at the sparse FFN's sizes (OPT-6.7B, batch 1, fp16): {dev_name}, {date}")
    lines.append(f"# CUDA-graph replay of {ROTATE} rotated input sets, median per call; copy peak {peak:.0f} GB/s "
                 "(1 GiB copy, bytes read + written, fastest of " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                                          COPY_WAYS.items()) +
                 "); '% peak' = touched bytes / time / copy peak")
    lines.append("")
    for name, ms in floors.items():
        lines.append(f"{name:<48} {ms * 1e3:7.2f} us")
        records.append({"device": dev_name, "date": date, "case": name, "bytes": 0, "ms": round(ms, 5),
                        "touched_gbps": None, "pct_of_copy_peak": None, "peak_gbps": round(peak, 1)})
    lines.append("")
    lines.append(f"{'sparsity':>8} {'MB':>6} {'contender':<44} {'us':>7} {'GB/s':>6} {'% peak':>7}")
    checks = []
    for sp in ctx.sparsities:
        n = round(FF * (1 - sp / 100))
        nbytes = touched_bytes(n)
        # fp16 elements in half the bytes, rounded down to 64 (< 256 bytes fewer): with a length that is no
        # multiple of 16, Triton's masked copy cannot use vector accesses (H200, 95%: 15.7 us before, 5.3 after)
        half = nbytes // 4 // 64 * 64
        srcs = [torch.randn(half, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
        dsts = [torch.empty_like(s) for s in srcs]
        reads = [torch.randn(nbytes // 2, device="cuda", generator=g).to(DTYPE) for _ in range(ROTATE)]
        idxs = active_sets(g, n)
        checks.append(check_accumulate(xs[0], caches[0], idxs[0], bias, sp))
        checks.append(check_pdl(xs[0], caches[0], idxs[0], bias, sp, sms, modes=(True, "early")))
        # the all-resident-rows form: a cache of just n rows, no index; 16 disjoint row ranges (none in L2)
        rows = [caches[i % 4][(i // 4) * n:(i // 4 + 1) * n] for i in range(ROTATE)]
        biases = [bias[(i // 4) * n:(i // 4 + 1) * n] for i in range(ROTATE)]

        def all_rows(i, pdl=False, config=None):
            return bundled_sparse_ffn(xs[i], rows[i], None, bias=biases[i], accumulate=accs[i], pdl=pdl,
                                      config=config)

        checks.append(check_pdl(xs[0], rows[0], None, biases[0], sp, sms, modes=(True, "early"), label="all rows"))
        if sp <= 95:
            checks += accumulate_sweep(lambda i, cfg: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], config=cfg), sp)
            checks += accumulate_sweep(lambda i, cfg: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], config=cfg, pdl="early"), sp,
                label="PDL early")
            checks += accumulate_sweep(lambda i, cfg: all_rows(i, "early", cfg), sp, label="all rows, PDL early")
        timed, read_cfgs = {}, {}
        for pdl, name in enumerate((READ_CASE, READ_CASE_PDL, READ_CASE_PDL_EARLY)):
            timed[name], read_cfgs[name] = best_read_ms(reads, sms, pdl)
        contenders = {
            "torch copy (same bytes touched)": [lambda i=i: dsts[i].copy_(srcs[i]) for i in range(ROTATE)],
            "Triton copy kernel (same bytes touched)": [
                lambda i=i: _copy_kernel[(triton.cdiv(half, 8192),)](srcs[i], dsts[i], half, BLOCK=8192, num_warps=8)
                for i in range(ROTATE)],
            "torch sum (reads the same bytes)": [lambda i=i: reads[i].sum() for i in range(ROTATE)],
            "our fused sparse FFN": [lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idxs[i], bias=bias)
                                     for i in range(ROTATE)],
            "ours, fp32 accumulate, no epilogue": [lambda i=i: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i]) for i in range(ROTATE)],
            "our fused sparse FFN, PDL": [lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idxs[i], bias=bias,
                                                                         pdl=True) for i in range(ROTATE)],
            "ours, fp32 accumulate, PDL": [lambda i=i: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], pdl=True) for i in range(ROTATE)],
            "ours, fp32 accumulate, PDL early": [lambda i=i: bundled_sparse_ffn(
                xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i], pdl="early") for i in range(ROTATE)],
        }
        timed.update({name: graph_ms(calls) for name, calls in contenders.items()})
        sizes = dict.fromkeys(timed, nbytes)
        for label, pdl in (("no PDL", False), ("PDL", True), ("PDL early", "early")):
            name = f"all rows (idx=None), accumulate, {label}"
            timed[name] = graph_ms([lambda i=i, pdl=pdl: all_rows(i, pdl) for i in range(ROTATE)])
            sizes[name] = touched_bytes(n, index=False)
        for name, ms in timed.items():
            size = sizes[name]
            gbps = size / ms / 1e6
            lines.append(f"{sp:>8} {size / 1e6:6.1f} {name:<44} {ms * 1e3:7.2f} {gbps:6.0f} {100 * gbps / peak:6.1f}%")
            records.append({"device": dev_name, "date": date, "case": name, "sparsity": sp, "bytes": size,
                            "ms": round(ms, 5), "touched_gbps": round(gbps, 1),
                            "pct_of_copy_peak": round(100 * gbps / peak, 1), "peak_gbps": round(peak, 1),
                            "config": read_cfgs.get(name)})
        checks += [f"# {sp}%: {name}: fastest config {cfg}" for name, cfg in read_cfgs.items()]
    write_outputs(ctx.out, "kernel_floor", lines + [""] + checks, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
