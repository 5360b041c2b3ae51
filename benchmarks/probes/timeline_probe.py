"""Probe: where the batch-1 sparse FFN's time goes between back-to-back PDL launches, read from the GPU's own
clock. Each program of an instrumented copy of the library's accumulating pdl='early' launch (one token, an
index, a bias, ReLU) stamps %globaltimer (ns, one clock for all SMs) and its %smid at: start, release from
griddepcontrol.wait, arrival of its first block of weights, first block computed (x read), loop end, closing
atomics issued. The same for the floor's streaming read that reads before its wait. ROTATE launches are
captured in one CUDA graph (as bench_kernels.py times them); one replay's stamps show, per launch, when its
programs start against when the previous launch's programs end on the same SM (do two launches share an SM?),
how long after the previous launch's last atomics the wait releases, and how long the work after the wait
takes.

    python benchmarks/probes/timeline_probe.py --out DIR [--sparsities 90,95]

'one block' cases give each program a share that fits one block (cdiv(n, BLOCK_R) programs, shares differing by
one row): it is requested whole before the wait and computed in one step after it; with light blocks two or
three programs fit an SM, so the next launch's programs can start beside this one's.

Instrumented launches are timed beside the uninstrumented library launch. The arrival of the first block is
stamped only in the 'arrival stamped' cases: the stamp needs a reduction over that block's tiles (its own
cost, a few hundred ns, is in that column). 'row shares' gives programs shares that differ by at most one row
instead of one block. 'partials stored' and 'one float stored' end the library's config as the streaming read
ends: each program stores its partial y in a row of its own (their sum is y, checked) or one float (no y: an
upper bound, not a usable kernel), instead of adding into the sum with atomics. Their % of peak counts the
same bytes as the library's (rows, index, bias, x, y): not the 2.1 MB of partials, nor the later sum of them.
%globaltimer ticks in 256 ns steps on the H200 (the figures are multiples of it). Writes DIR/results/timeline_probe.txt and
DIR/results/timeline_probe.json (flat records: per case, one with the medians and one per launch)."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

from bench_kernels import ROTATE, graph_ms, sparse_ffn_mod  # noqa: E402
from _results import write_outputs  # noqa: E402
from kernel_floor import D, probe_case, probe_setup, read_share  # noqa: E402
from real.kernels.sparse_ffn import bundled_sparse_ffn  # noqa: E402

N_STAMPS = 8   # per program: smid, then up to 7 stamps (unused ones stay 0)
# (BLOCK_R, warps) tried with the whole share in one block (sm_90, uncapped: 8x8 179 registers, 8x16 101,
# 4x8 106 and 4x4 168, so two or three of those programs fit an SM, 2x4 114)
ONE_BLOCK_CONFIGS = ((8, 8), (8, 16), (4, 8), (4, 4), (2, 4))
ONE_BLOCK_MAX_PER_SM = 3


@triton.jit
def _stamp(dep):
    """%globaltimer (ns), read after `dep` (an int32 scalar) is computed: the data dependence orders it."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _smid(dep):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _bits(v):
    return v.to(tl.int32, bitcast=True)


@triton.jit
def _ids(idx_ptr, pos, end, BLOCK_R: tl.constexpr):
    offs = pos + tl.arange(0, BLOCK_R)
    m = offs < end
    return tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64), m


@triton.jit
def _tiles(cache_ptr, bias_ptr, rows, m, d, D: tl.constexpr):
    u = tl.load(cache_ptr + rows[:, None] * (2 * D) + d[None, :], mask=m[:, None], other=0.0)
    dn = tl.load(cache_ptr + rows[:, None] * (2 * D) + D + d[None, :], mask=m[:, None], other=0.0)
    b = tl.load(bias_ptr + rows, mask=m, other=0.0).to(tl.float32)
    return u, dn, b


@triton.jit
def _contrib(xv, u, dn, b, m):
    h = tl.where(m, tl.maximum(tl.sum(u.to(tl.float32) * xv[None, :], axis=1) + b, 0.0), 0.0)
    return tl.sum(dn.to(tl.float32) * h[:, None], axis=0)


@triton.jit
def _early_ffn_traced(x_ptr, cache_ptr, bias_ptr, idx_ptr, n, acc_ptr, trace_ptr, launch,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, STAMP_ARRIVAL: tl.constexpr,
                      ROW_SHARES: tl.constexpr = False, ONE_BLOCK: tl.constexpr = False, END: tl.constexpr = 0):
    """The library's _stream_kernel with PDL=2, FINISH=False, one token, an index and a bias, stamped.
    ROW_SHARES: programs' shares differ by at most one row (the library's: by at most one block of rows).
    ONE_BLOCK (with ROW_SHARES, every share <= BLOCK_R): the whole share is one block, requested before the
    wait and computed in one step after it (no second block, no loop).
    END: how a program hands over its share of y. 0: atomics into acc (the library's); 1: a plain store into
    row pid of acc [G, D] (partials; their sum is y); 2: one float per program (the sum of its share: no y,
    timing only, the streaming read's ending)."""
    pid = tl.program_id(0)
    t0 = _stamp(pid)
    gdc_launch_dependents()
    G = tl.num_programs(0)
    if ROW_SHARES:
        start = (pid * n) // G
        end = ((pid + 1) * n) // G
    else:
        n_blk = tl.cdiv(n, BLOCK_R)
        start = ((pid * n_blk) // G) * BLOCK_R
        end = tl.minimum((((pid + 1) * n_blk) // G) * BLOCK_R, n)
    d = tl.arange(0, D)
    # as the library: row ids one block further ahead than the tiles
    rows, m = _ids(idx_ptr, start, end, BLOCK_R)
    rows_n, m_n = _ids(idx_ptr, start + BLOCK_R, end, BLOCK_R)
    rows_f, m_f = _ids(idx_ptr, start + 2 * BLOCK_R, end, BLOCK_R)
    u, dn, b = _tiles(cache_ptr, bias_ptr, rows, m, d, D)
    if not ONE_BLOCK:
        u_n, dn_n, b_n = _tiles(cache_ptr, bias_ptr, rows_n, m_n, d, D)
    gdc_wait()
    t1 = _stamp(pid)
    t2 = tl.zeros([], tl.int64)    # not stamped: left 0 (no value)
    if STAMP_ARRIVAL:
        t2 = _stamp(_bits(tl.sum(u.to(tl.float32), axis=None) + tl.sum(dn.to(tl.float32), axis=None)))
    x0 = tl.load(x_ptr + d).to(tl.float32)
    part = _contrib(x0, u, dn, b, m)
    t3 = _stamp(_bits(tl.sum(part, axis=0)))
    if not ONE_BLOCK:
        u, dn, b, m = u_n, dn_n, b_n, m_n
        rows_n, m_n = rows_f, m_f
        for r0 in range(start + BLOCK_R, end, BLOCK_R):
            rows_f, m_f = _ids(idx_ptr, r0 + 2 * BLOCK_R, end, BLOCK_R)
            u_n, dn_n, b_n = _tiles(cache_ptr, bias_ptr, rows_n, m_n, d, D)
            part += _contrib(x0, u, dn, b, m)
            u, dn, b, m = u_n, dn_n, b_n, m_n
            rows_n, m_n = rows_f, m_f
    t4 = _stamp(_bits(tl.sum(part, axis=0)))
    if END == 0:
        if start < end:
            tl.atomic_add(acc_ptr + d, part, sem="relaxed")
    elif END == 1:
        tl.store(acc_ptr + pid * D + d, part)
    else:
        tl.store(acc_ptr + pid, tl.sum(part, axis=0))
    t5 = _stamp(pid)
    base = trace_ptr + (launch * G + pid) * 8
    tl.store(base, _smid(pid).to(tl.int64))
    tl.store(base + 1, t0)
    tl.store(base + 2, t1)
    tl.store(base + 3, t2)
    tl.store(base + 4, t3)
    tl.store(base + 5, t4)
    tl.store(base + 6, t5)


@triton.jit
def _read_traced(src_ptr, out_ptr, n, per_prog, trace_ptr, launch, BLOCK: tl.constexpr):
    """kernel_floor's streaming read with PDL 2 (reads before the wait), stamped: start, reads done, wait
    released, store issued."""
    pid = tl.program_id(0)
    t0 = _stamp(pid)
    gdc_launch_dependents()
    G = tl.num_programs(0)
    start = pid * per_prog
    s = tl.sum(read_share(src_ptr, start, tl.minimum(start + per_prog, n), BLOCK), axis=0)
    t1 = _stamp(_bits(s))
    gdc_wait()
    t2 = _stamp(pid)
    tl.store(out_ptr + pid, s)
    t3 = _stamp(pid)
    base = trace_ptr + (launch * G + pid) * 8
    tl.store(base, _smid(pid).to(tl.int64))
    tl.store(base + 1, t0)
    tl.store(base + 2, t2)   # same columns as the FFN: start, wait released, (reads done), ..., end
    tl.store(base + 3, t1)
    tl.store(base + 6, t3)


def summarize(trace: torch.Tensor) -> dict:
    """trace [launches, programs, 8] int64 -> per-launch figures and their medians over the middle launches, us.
    Columns: 0 smid, 1 start, 2 wait released, 3 first block arrived / reads done, 4 first block computed,
    5 loop end, 6 atomics (or store) issued."""
    t = trace.cpu().numpy().astype(np.float64)
    stamps = t[:, :, 1:]
    s = np.where(stamps == 0, np.nan, (stamps - stamps[:, :, 0].min()) / 1e3)  # us since the first start
    rows = []
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)   # columns a kernel does not stamp
    for k in range(1, t.shape[0]):
        prev, cur = s[k - 1], s[k]
        # same SM: did this launch's program start before the previous launch's last program there ended?
        prev_end: dict = {}
        for sm, e in zip(t[k - 1, :, 0], prev[:, 5]):
            prev_end[int(sm)] = max(prev_end.get(int(sm), -math.inf), e)
        shared = [st < prev_end[int(sm)] for sm, st in zip(t[k, :, 0], cur[:, 0]) if int(sm) in prev_end]
        rows.append({
            "launch": k,
            "period": np.nanmin(cur[:, 0]) - np.nanmin(prev[:, 0]),
            "start_spread": np.nanmax(cur[:, 0]) - np.nanmin(cur[:, 0]),
            "first_start_after_prev_first_end": np.nanmin(cur[:, 0]) - np.nanmin(prev[:, 5]),
            "shares_sm_with_prev": sum(shared) / max(1, len(shared)),
            "wait_after_prev_last_end": np.nanmin(cur[:, 1]) - np.nanmax(prev[:, 5]),
            "wait_spread": np.nanmax(cur[:, 1]) - np.nanmin(cur[:, 1]),
            "arrival_after_start": np.nanmedian(cur[:, 2] - cur[:, 0]),
            "arrival_after_wait": np.nanmedian(cur[:, 2] - cur[:, 1]),
            "first_block_after_wait": np.nanmedian(cur[:, 3] - cur[:, 1]),
            "loop_end_after_wait": np.nanmedian(cur[:, 4] - cur[:, 1]),
            "end_after_wait_max": np.nanmax(cur[:, 5]) - np.nanmin(cur[:, 1]),
            "end_spread": np.nanmax(cur[:, 5]) - np.nanmin(cur[:, 5]),
        })
    rows = [{k: int(v) if k == "launch" else float(v) for k, v in r.items()} for r in rows]
    mid = rows[2:-2] if len(rows) > 6 else rows
    summary = {k: float(np.nanmedian([r[k] for r in mid])) for k in mid[0] if k != "launch"}
    return summary | {"per_launch": rows}


def _json_num(v: float):
    """Rounded, or None where nothing was stamped (NaN is not JSON)."""
    return None if math.isnan(v) else round(v, 3)


FIELDS = (("period", "period"), ("start_spread", "start spread"),
          ("first_start_after_prev_first_end", "1st start - prev 1st end"),
          ("shares_sm_with_prev", "share SM w/ prev"), ("wait_after_prev_last_end", "wait - prev last end"),
          ("wait_spread", "wait spread"), ("arrival_after_start", "arrival - start"),
          ("arrival_after_wait", "arrival - wait"), ("first_block_after_wait", "1st block - wait"),
          ("loop_end_after_wait", "loop end - wait"), ("end_after_wait_max", "last end - 1st wait"),
          ("end_spread", "end spread"))


def main() -> int:
    ctx = probe_setup(__doc__)
    sms = ctx.sms
    lines = [f"# timeline probe, OPT-6.7B batch 1 fp16: {ctx.dev}, {ctx.date}",
             f"# {ROTATE} launches in one CUDA graph; medians over launches 3..{ROTATE - 3} of one replay, us; "
             f"copy peak {ctx.peak:.0f} GB/s"]
    records = []
    for sp in ctx.sparsities:
        n, nbytes, idxs, ref = probe_case(ctx, sp)
        lib_cfg = sparse_ffn_mod.early_config(n, sms, D, False)
        accs = [torch.zeros(1, D, device="cuda") for _ in range(ROTATE)]
        lib_ms = graph_ms([lambda i=i: bundled_sparse_ffn(ctx.xs[i], ctx.caches[i % 4], idxs[i], bias=ctx.bias,
                                                          accumulate=accs[i], pdl="early")
                           for i in range(ROTATE)])
        lines.append(f"\n## {sp}%: {n} rows, {nbytes / 1e6:.1f} MB; library pdl='early' ({lib_cfg['BLOCK_R']} rows x "
                     f"{lib_cfg['num_warps']} warps) {lib_ms * 1e3:.2f} us = "
                     f"{100 * nbytes / lib_ms / 1e6 / ctx.peak:.1f}% of peak")
        cases = []
        for block_r, warps in sorted({(lib_cfg["BLOCK_R"], lib_cfg["num_warps"]), (4, 8), (2, 16)}):
            for rows, arrival in ((False, False), (False, True), (True, False)):
                cases.append((f"FFN early {block_r}x{warps}{', row shares' if rows else ''}"
                              f"{', arrival stamped' if arrival else ''}", "ffn",
                              dict(BLOCK_R=block_r, num_warps=warps, STAMP_ARRIVAL=arrival, ROW_SHARES=rows)))
        # the library's config ending as the streaming read does: plain stores of partials, or one float each
        for end, label in ((1, "partials stored"), (2, "one float stored")):
            cases.append((f"FFN early {lib_cfg['BLOCK_R']}x{lib_cfg['num_warps']}, {label}", "ffn",
                          dict(BLOCK_R=lib_cfg["BLOCK_R"], num_warps=lib_cfg["num_warps"], STAMP_ARRIVAL=False,
                               END=end)))
        # the whole share in one block: cdiv(n, BLOCK_R) programs, up to ONE_BLOCK_MAX_PER_SM a SM
        for block_r, warps in ONE_BLOCK_CONFIGS:
            if triton.cdiv(n, block_r) <= ONE_BLOCK_MAX_PER_SM * sms:
                cases.append((f"FFN early {block_r}x{warps}, one block, {triton.cdiv(n, block_r)} programs", "ffn",
                              dict(BLOCK_R=block_r, num_warps=warps, STAMP_ARRIVAL=False, ROW_SHARES=True,
                                   ONE_BLOCK=True)))
        cases.append(("streaming read, reads before wait", "read", {}))
        for name, kind, meta in cases:
            if kind == "ffn":
                blocks = triton.cdiv(n, meta["BLOCK_R"])
                grid = (blocks if meta.get("ONE_BLOCK") else min(blocks, sms),)
                trace = torch.zeros(ROTATE, grid[0], N_STAMPS, dtype=torch.int64, device="cuda")
                end = meta.get("END", 0)
                # END 1 and 2 write G rows / G floats per launch instead of adding into a [1, D] sum
                outs = accs if end == 0 else [torch.zeros(grid[0], D, device="cuda") for _ in range(ROTATE)]
                acc = torch.zeros_like(outs[0])
                _early_ffn_traced[grid](ctx.xs[0], ctx.caches[0], ctx.bias, idxs[0], n, acc, trace, 0, D=D,
                                        launch_pdl=True, **meta)
                if end < 2:
                    got = acc.sum(0)
                    rel = float((got - ref[0].view(-1)).norm() / ref[0].norm())
                    if rel > 2e-3:
                        raise SystemExit(f"{name} at {sp}%: relative error {rel:.2e} against the library")
                calls = [lambda i=i: _early_ffn_traced[grid](ctx.xs[i], ctx.caches[i % 4], ctx.bias, idxs[i], n,
                                                             outs[i], trace, i, D=D, launch_pdl=True, **meta)
                         for i in range(ROTATE)]
            else:
                half = nbytes // 2       # fp16 elements of nbytes; 4 sets per cache, one cache per i % 4
                srcs = [ctx.caches[i % 4].view(-1)[(i // 4) * half:(i // 4 + 1) * half] for i in range(ROTATE)]
                out = torch.empty(sms, device="cuda")
                per = triton.cdiv(triton.cdiv(srcs[0].numel(), sms), 4096) * 4096
                grid = (triton.cdiv(srcs[0].numel(), per),)
                trace = torch.zeros(ROTATE, grid[0], N_STAMPS, dtype=torch.int64, device="cuda")
                calls = [lambda i=i: _read_traced[grid](srcs[i], out, srcs[i].numel(), per, trace, i, BLOCK=4096,
                                                        num_warps=8, launch_pdl=True) for i in range(ROTATE)]
            ms = graph_ms(calls)     # its last replay leaves its stamps in trace
            summ = summarize(trace)
            lines.append(f"{name:<38} {ms * 1e3:6.2f} us {100 * nbytes / ms / 1e6 / ctx.peak:5.1f}%  " + "  ".join(
                f"{label} {summ[key]:.2f}" for key, label in FIELDS))
            print(lines[-1], flush=True)
            # flat records: one with the medians (launch "median"), then one per launch of the replay
            common = {"device": ctx.dev, "date": ctx.date, "sparsity": sp, "case": name, "ms": round(ms, 5),
                      "library_early_ms": round(lib_ms, 5), "bytes": nbytes, "peak_gbps": round(ctx.peak, 1)}
            records.append({**common, "launch": "median",
                            **{k: _json_num(v) for k, v in summ.items() if k != "per_launch"}})
            records += [{**common, **{k: _json_num(v) if k != "launch" else v for k, v in r.items()}}
                        for r in summ["per_launch"]]
    write_outputs(ctx.out, "timeline_probe", lines, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
