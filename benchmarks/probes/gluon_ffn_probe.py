"""Probe: the batch-1 sparse FFN in Gluon, weight rows staged in shared memory by cp.async (sm_90).

Each program keeps S bundle rows (up column | down row, 2*D fp16 = 16 KB each) in flight in a shared ring, so
~100 KB of weights are requested while holding few registers: two programs of consecutive PDL launches can then
share an SM. Order per program: launch_dependents; cp.async of the first S rows (idx, cache, bias are not
written by the previous kernel); griddepcontrol.wait; load x; per row: wait its group, h = relu(x.u + b),
part += h*d, refill the freed slot; relaxed atomic add of part into acc.

    python benchmarks/probes/gluon_ffn_probe.py [--variants | --timeline]
        compile_sm90() of every config; on a CUDA machine also launch() vs reference() for each, then the
        timings against the library's pdl='early' launch (default), the group kernel without its wait and/or
        its math (--variants), or its programs' %globaltimer stamps read by timeline_probe.summarize (--timeline)

Barriers: Gluon runs Triton's membar pass, which (a) puts a bar.sync after every async_copy.wait_group, whatever
the layouts (each thread here reads only bytes it copied, so wait_group alone would do); (b) sees the ring as one
buffer, so it puts a bar.sync between two copy ops into it (hence one copy op per 16 KB row, and S - 1 barriers
in the prologue); (c) the CTA-wide sum takes its usual two. In the loop: 3 bar.sync a row.

The group kernel (2026-12-03, second try) takes G rows a step from NB buffers of G rows: one commit group, one wait
and one CTA-wide sum of G dots per step, so 3 bar.sync per G rows (the sum's barrier already follows the step's
shared reads, so membar adds none before the refill). Its tile keeps the G rows in every thread and the warps
along the columns, so the down sum over G is in-thread. The share's row ids and biases sit in shared tables
filled before the wait, so the loop has no global load.

Measured (H200, 2026-12-03; logs gluon_group_probe_h200.log, gluon_variants_h200.log, gluon_timeline_h200.log,
gluon_tables_h200.log, gluon_tables_timeline_h200.log): all correct, none faster than the library. At OPT 90%
the best group config took 12.0 us against the library's 10.1. Without the wait (legal only where no kernel writes
x, as in this bench) the same kernel took 7.7 us = 82% of the copy peak, and without the math only 0.1 us less:
the cost is the PDL wait. The timeline shows why: the launches do share SMs (the next ones start ~10-24 us ahead
and prefetch), but each wait releases 3.8-5.1 us after the previous launch's last program issued its atomics,
against 1.8-2.3 us for the library's launch, which runs one launch at a time. The queued prefetches of the
launches ahead appear to delay the completion that the wait needs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent), str(_HERE.parents[1])]   # probes/, benchmarks/, the repo: the timing
# functions import kernel_floor and bench_kernels lazily

D_MODEL = 4096


@gluon.jit
def _ffn_ring_kernel(x_ptr, cache_ptr, idx_ptr, bias_ptr, acc_ptr, n, D: gl.constexpr, S: gl.constexpr):
    gdc_launch_dependents()               # the next PDL launch may start its prologue now
    # one layout for x, u, d, part and the copies: each thread owns 8 contiguous halves (one 16-byte cp.async)
    # per repeat, so it reads back from shared memory exactly the bytes it copied itself
    # (num_warps is a launch option, read here with gl.num_warps(): a kernel argument of that name would swallow it)
    lay: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    smem_lay: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # unswizzled; leading dim = slot index
    offs = gl.arange(0, D, layout=lay)
    offs2 = gl.arange(0, 2 * D, layout=lay)  # a whole bundle row: one copy op per row (membar, above)

    pid = gl.program_id(0)
    G = gl.num_programs(0)
    start = (pid * n) // G
    share = ((pid + 1) * n) // G - start

    ring = gl.allocate_shared_memory(gl.float16, [S, 2 * D], smem_lay)
    # prologue: S commit groups (empty ones where the share is shorter), so row k is always group k
    for j in gl.static_range(S):
        if j < share:
            row = gl.load(idx_ptr + start + j).to(gl.int64)
            async_copy.async_copy_global_to_shared(ring.index(j), cache_ptr + row * (2 * D) + offs2)
        async_copy.commit_group()
    # scalars run ahead of the rows so no load waits on another inside the loop: b_next = bias of row k,
    # r_next = id of row k + 1 (bias is not written by the previous kernel either)
    b_next = gl.load(bias_ptr + gl.load(idx_ptr + start, mask=share > 0, other=0), mask=share > 0, other=0.0)
    r_next = gl.load(idx_ptr + start + 1, mask=share > 1, other=0)

    gdc_wait()                            # the previous kernel wrote x: nothing reads x before this
    x = gl.load(x_ptr + offs).to(gl.float32)
    part = gl.zeros([D], gl.float32, layout=lay)
    for k in range(share):
        s = k % S
        b = b_next.to(gl.float32)
        # issued now, used an iteration later (or after this row's work): their latency hides under it
        b_next = gl.load(bias_ptr + r_next, mask=k + 1 < share, other=0.0)
        r_next = gl.load(idx_ptr + start + k + 2, mask=k + 2 < share, other=0)
        refill = k + S < share
        nxt = gl.load(idx_ptr + start + k + S, mask=refill, other=0).to(gl.int64)
        # S + k groups committed, row k is group k: at most S - 1 may still be in flight
        async_copy.wait_group(S - 1)
        slot = ring.index(s)
        u = slot.slice(0, D).load(lay).to(gl.float32)
        d = slot.slice(D, D).load(lay).to(gl.float32)
        h = gl.maximum(gl.sum(x * u, axis=0) + b, 0.0)
        part += h * d
        if refill:                        # the slot just read takes row k + S
            async_copy.async_copy_global_to_shared(slot, cache_ptr + nxt * (2 * D) + offs2)
        async_copy.commit_group()         # one group per iteration, maybe empty: keeps the count above
    async_copy.wait_group(0)              # no copy may outlive the program's shared memory
    gl.atomic_add(acc_ptr + offs, part, mask=offs < D, sem="relaxed")  # (mask all-true: D is the tile)


@gluon.jit
def _ffn_group_kernel(x_ptr, cache_ptr, idx_ptr, bias_ptr, acc_ptr, n, trace_ptr, launch_no, D: gl.constexpr,
                      G: gl.constexpr, NB: gl.constexpr, MAXG: gl.constexpr, SKIP_WAIT: gl.constexpr = False,
                      SKIP_MATH: gl.constexpr = False, TRACE: gl.constexpr = False):
    """The ring kernel with G rows a step: NB buffers of G bundle rows; one cp.async group, one wait and one CTA-wide
    sum (of G dot products at once) per G rows, where _ffn_ring_kernel pays its three barriers per row. The
    share's row ids and biases are read once, before the wait, into shared tables of MAXG groups (>= the share's
    groups + NB): no global load is left in the loop, whose steps would otherwise each wait on one.
    Diagnostics only (wrong in general): SKIP_WAIT reads x without waiting for the previous kernel (right here,
    where no kernel writes x); SKIP_MATH waits for each group's copies but reads nothing of them (y = 0).
    TRACE stamps %globaltimer into trace_ptr[launch_no, program] as timeline_probe.summarize reads it (smid,
    start, wait released, -, x read, loop end, atomics issued)."""
    if TRACE:
        t0 = _gstamp(gl.program_id(0))
    gdc_launch_dependents()
    # warps along the columns: a [G, *] tile's rows are in every thread, so the down sum over G is in-thread and
    # the G dots share one cross-warp reduction; each thread owns 8 contiguous halves per repeat, and reads back
    # exactly the bytes it copied (D is a multiple of 8 * 32 * num_warps)
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, gl.num_warps()], [1, 0])
    rows_lay: gl.constexpr = gl.SliceLayout(1, lay)
    cols_lay: gl.constexpr = gl.SliceLayout(0, lay)
    smem_lay: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # order of one buffer [G, 2D]
    offs = gl.arange(0, D, layout=cols_lay)
    offs2 = gl.arange(0, 2 * D, layout=cols_lay)
    r = gl.arange(0, G, layout=rows_lay)

    pid = gl.program_id(0)
    P = gl.num_programs(0)
    start = (pid * n) // P
    share = ((pid + 1) * n) // P - start
    steps = (share + G - 1) // G

    # the share's ids and biases, [MAXG, G] tables in shared memory (idx and bias are not written by the
    # previous kernel, so these may precede the wait); stored whole, then read a group at a time through a view
    # of the same (unswizzled, row-major) bytes whose layout lets .index(k) give a [G] row
    tbl_lay: gl.constexpr = gl.BlockedLayout([1, G], [32, 1], [gl.num_warps(), 1], [1, 0])
    tj = gl.arange(0, MAXG, layout=gl.SliceLayout(1, tbl_lay))[:, None] * G + \
        gl.arange(0, G, layout=gl.SliceLayout(0, tbl_lay))[None, :]
    tm = tj < share
    ids = gl.load(idx_ptr + start + tj, mask=tm, other=0)
    whole: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    rowwise: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    ids_w = gl.allocate_shared_memory(gl.int32, [MAXG, G], whole)
    bias_w = gl.allocate_shared_memory(gl.float32, [MAXG, G], whole)
    ids_w.store(ids)
    bias_w.store(gl.load(bias_ptr + ids, mask=tm, other=0.0).to(gl.float32))
    ids_s = ids_w._reinterpret(gl.int32, [MAXG, G], rowwise)
    bias_s = bias_w._reinterpret(gl.float32, [MAXG, G], rowwise)

    ring = gl.allocate_shared_memory(gl.float16, [NB, G, 2 * D], smem_lay)
    for j in gl.static_range(NB):        # group j -> buffer j; masked rows copy zeros (src-size 0), read nothing
        m = j * G + r < share
        rows = ids_s.index(j).load(rows_lay).to(gl.int64)
        async_copy.async_copy_global_to_shared(ring.index(j), cache_ptr + rows[:, None] * (2 * D) + offs2[None, :],
                                               mask=m[:, None] & (offs2[None, :] < 2 * D))
        async_copy.commit_group()

    if not SKIP_WAIT:
        gdc_wait()                        # the previous kernel wrote x: nothing reads x before this
    if TRACE:
        t1 = _gstamp(pid)
    x = gl.load(x_ptr + offs).to(gl.float32)
    if TRACE:
        t3 = _gstamp(gl.sum(x, axis=0).to(gl.int32, bitcast=True))
    part = gl.zeros([D], gl.float32, layout=cols_lay)
    for k in range(steps):
        b = bias_s.index(k).load(rows_lay)
        mr = (k + NB) * G + r < share
        refill = ids_s.index(k + NB).load(rows_lay).to(gl.int64)
        async_copy.wait_group(NB - 1)     # NB + k groups committed, step k's is group k
        buf = ring.index(k % NB)
        if not SKIP_MATH:
            u = buf.slice(0, D, dim=1).load(lay).to(gl.float32)
            d = buf.slice(D, D, dim=1).load(lay).to(gl.float32)
            h = gl.maximum(gl.sum(u * x[None, :], axis=1) + b, 0.0)
            part += gl.sum(h[:, None] * d, axis=0)
        async_copy.async_copy_global_to_shared(buf, cache_ptr + refill[:, None] * (2 * D) + offs2[None, :],
                                               mask=mr[:, None] & (offs2[None, :] < 2 * D))
        async_copy.commit_group()
    async_copy.wait_group(0)              # no copy may outlive the program's shared memory
    if TRACE:
        t4 = _gstamp(gl.sum(part, axis=0).to(gl.int32, bitcast=True))
    gl.atomic_add(acc_ptr + offs, part, mask=offs < D, sem="relaxed")
    if TRACE:
        t5 = _gstamp(pid)
        base = trace_ptr + (launch_no * P + pid) * 8
        gl.store(base, _gsmid(pid).to(gl.int64))
        gl.store(base + 1, t0)
        gl.store(base + 2, t1)
        gl.store(base + 4, t3)
        gl.store(base + 5, t4)
        gl.store(base + 6, t5)


@gluon.jit
def _gstamp(dep):
    """%globaltimer (ns), read after the int32 scalar `dep` is computed (timeline_probe's stamp, in Gluon)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=gl.int64, is_pure=False,
                                     pack=1)


@gluon.jit
def _gsmid(dep):
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=gl.int32, is_pure=False, pack=1)


def _grid_size(n: int, device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 132
    return max(1, min(sms, n))


def _table_groups(n: int, programs: int, G: int, S: int) -> int:
    """Groups of G in the group kernel's id/bias tables: a longest share's groups + S (the refills the loop
    reads past the end), rounded up to a power of two."""
    return triton.next_power_of_2(triton.cdiv(triton.cdiv(n, programs), G) + S)


def launch(x, cache, idx, bias, acc, S=6, num_warps=8, pdl=True, G=None, **diag):
    """acc[D] (fp32, zeroed by the caller) += sum over idx of relu(x.u_r + bias_r) * d_r. G=None: the ring kernel,
    S rows deep; else the group kernel, S groups of G rows deep."""
    n = idx.numel()
    if n == 0:
        return acc
    D = x.numel()
    assert cache.shape[1] == 2 * D and cache.is_contiguous() and x.dtype == cache.dtype == torch.float16
    grid = (_grid_size(n, x.device),)
    if G is None:
        _ffn_ring_kernel[grid](x, cache, idx, bias, acc, n, D=D, S=S, num_warps=num_warps, launch_pdl=pdl)
    else:
        trace, launch_no = diag.pop("trace", (acc, 0))   # (int64 [launches, programs, 8], this launch's row)
        _ffn_group_kernel[grid](x, cache, idx, bias, acc, n, trace, launch_no, D=D, G=G, NB=S,
                                MAXG=_table_groups(n, grid[0], G, S), num_warps=num_warps, launch_pdl=pdl,
                                TRACE=trace is not acc, **diag)
    return acc


def reference(x, cache, idx, bias):
    D = x.numel()
    rows = cache[idx.long()].double()
    h = torch.relu(rows[:, :D] @ x.double() + bias[idx.long()].double())
    return (h @ rows[:, D:]).float()


# ---------------------------------------------------------------------------------------------- compile only
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _ptx_order(ptx: str) -> dict:
    """Counts, in the PTX's text order, of x's global loads and of cp.async before and after griddepcontrol.wait.
    Registers holding x's address are those derived from its parameter through any instruction (a flow-
    insensitive closure: it can only over-count x's loads, never miss one)."""
    insts = []
    for line in ptx[ptx.index(".entry"):].splitlines():
        for ins in line.split("//")[0].split(";"):               # drop comments, split statements
            ins = re.sub(r"^\s*(\$\w+:)?\s*(@!?%\w+\s+)?", "", ins)  # drop label and predicate guard
            if ins and not ins.startswith((".", "{", "}")):
                insts.append(ins)
    tainted = {re.search(r"ld\.param\.[bu]64\s+(%rd\d+),\s*\[\w+_param_0\]", ptx).group(1)}
    changed = True
    while changed:                                               # propagate source -> destination (first reg)
        changed = False
        for ins in insts:
            regs = re.findall(r"%\w+", ins)
            if len(regs) >= 2 and regs[0] not in tainted and any(r in tainted for r in regs[1:]):
                tainted.add(regs[0])
                changed = True
    wait = next(i for i, ins in enumerate(insts) if ins.startswith("griddepcontrol.wait"))
    is_x = [ins.startswith("ld.global") and re.search(r"\[\s*(%\w+)", ins).group(1) in tainted for ins in insts]
    is_cp = [re.match(r"cp\.async\.c[ag]\.", ins) is not None for ins in insts]
    return dict(x_before=sum(is_x[:wait]), x_after=sum(is_x[wait:]), cp_before=sum(is_cp[:wait]),
                cp_after=sum(is_cp[wait:]))


def compile_sm90(S: int = 6, num_warps: int = 8, D: int = D_MODEL, G=None, trace: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _ffn_ring_kernel if G is None else _ffn_group_kernel
    types = dict(x_ptr="*fp16", cache_ptr="*fp16", idx_ptr="*i32", bias_ptr="*fp16", acc_ptr="*fp32", n="i32",
                 trace_ptr="*i64", launch_no="i32")
    consts = dict(D=D, S=S) if G is None else dict(D=D, G=G, NB=S, MAXG=_table_groups(1638, 132, G, S),
                                                   SKIP_WAIT=False, SKIP_MATH=False, TRACE=trace)
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    # pointers 16-byte aligned, as a launch from torch specializes them
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if sig[a].startswith("*")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True).stdout
    f = dict(m.groups() for m in re.finditer(r"(\w+):(\d+)", res))
    regs, stack, smem = int(f.get("REG", -1)), int(f.get("STACK", -1)), k.metadata.shared
    threads = 32 * num_warps
    fits2 = 2 * regs * threads <= 65536 and 2 * (smem + 1024) <= 228 * 1024 and smem <= 227 * 1024
    print(f"{'ring' if G is None else f'group G={G}'} S={S} warps={num_warps}: {regs} registers/thread, {smem} B shared/program, {stack} B stack "
          f"(spills: {'none' if stack == 0 else stack}); 2 programs/SM: {'yes' if fits2 else 'NO'} "
          f"(regs {2 * regs * threads}/65536, smem 2x({smem}+1024 reserved)={2 * (smem + 1024)}/{228 * 1024})")

    o = _ptx_order(ptx)
    first = {key: ptx.find(key) for key in ("griddepcontrol.launch_dependents", "cp.async.cg", "griddepcontrol.wait")}
    ok = (0 <= first["griddepcontrol.launch_dependents"] < first["cp.async.cg"] < first["griddepcontrol.wait"]
          and o["cp_before"] == S * (G or 1) * (2 * D) // (8 * 32 * num_warps) and o["x_before"] == 0
          and o["x_after"] > 0)
    print(f"PTX order: launch_dependents, then {o['cp_before']} cp.async (the prologue's), then griddepcontrol.wait, "
          f"then {o['cp_after']} cp.async (refills); ld.global of x: {o['x_before']} before the wait, "
          f"{o['x_after']} after -> {'OK' if ok else 'FAIL'}")
    # the same order after ptxas: PREEXIT = launch_dependents, ACQBULK = griddepcontrol.wait, LDGSTS = cp.async;
    # x's loads are the kernel's only 128-bit LDGs (16 halves a thread), idx and bias loads are 32/16-bit
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, re.M)
    acq = ops.index("ACQBULK") if "ACQBULK" in ops else -1
    n_cp = sum(op.startswith("LDGSTS") for op in ops[:acq])
    x128 = sum(op.startswith("LDG.E.128") for op in ops[:acq]), sum(op.startswith("LDG.E.128") for op in ops[acq:])
    sass_ok = 0 <= ops.index("PREEXIT") < acq and n_cp == o["cp_before"] and x128[0] == 0 and x128[1] > 0
    print(f"SASS order: PREEXIT, {n_cp} LDGSTS, ACQBULK; 128-bit LDG (x) {x128[0]} before / {x128[1]} after "
          f"-> {'OK' if sass_ok else 'FAIL'}")
    ok = ok and sass_ok
    counts = {key: ptx.count(key) for key in ("cp.async.cg.shared.global", "cp.async.commit_group",
                                              "cp.async.wait_group", "bar.sync", "griddepcontrol.wait",
                                              " red.global", " atom.global")}
    vec = set(re.findall(r"cp\.async\.c[ag]\.shared\.global[^\[]*\[[^\]]+\],\s*\[[^\]]+\],\s*(\w+)", ptx))
    print(f"PTX counts: {counts}; cp.async sizes (bytes): {sorted(vec)}")
    return dict(regs=regs, smem=smem, stack=stack, fits2=fits2, order_ok=ok, ptx=ptx, kernel=k)


# (G, S, num_warps): G=None is the ring kernel (S rows deep), else the group kernel (S groups of G rows deep)
CONFIGS = [(None, 4, 8), (None, 6, 8), (1, 6, 8), (2, 3, 8), (2, 2, 8), (4, 1, 8), (2, 3, 16), (2, 3, 4)]


def _name(G, S, w) -> str:
    return f"ring S={S} w{w}" if G is None else f"group G={G} S={S} w{w}"


def _check_cuda():
    torch.manual_seed(0)
    dev, D, n_rows = "cuda", D_MODEL, 16384
    cache = (torch.randn(n_rows, 2 * D, device=dev) * 0.02).half()
    bias = (torch.randn(n_rows, device=dev) * 0.1).half()
    x = torch.randn(D, device=dev).half()
    failed = []

    def check(name, acc, ref):
        torch.cuda.synchronize()
        err = ((acc - ref).norm() / ref.norm()).item()       # relative to the whole vector's norm
        ok = err < 2e-3
        print(f"{name}: relative error {err:.1e} {'OK' if ok else 'FAIL'}")
        if not ok:
            failed.append(name)

    # OPT-6.7B at 90% / 95% sparsity of 16384, then shares shorter than a ring (n=300: 2-3 rows a program)
    for n in (1638, 819, 300):
        idx = torch.randperm(n_rows, device=dev)[:n].sort().values.int()
        ref = reference(x, cache, idx, bias)
        for G, S, w in CONFIGS:
            for pdl in (True, False):
                acc = torch.zeros(D, device=dev, dtype=torch.float32)
                check(f"n={n} {_name(G, S, w)} pdl={pdl}", launch(x, cache, idx, bias, acc, S=S, num_warps=w, pdl=pdl,
                                                                  G=G), ref)
    # empty shares: more programs than rows (launch() never does this)
    idx = idx[:5].contiguous()
    ref = reference(x, cache, idx, bias)
    for G, S, w in CONFIGS:
        acc = torch.zeros(D, device=dev, dtype=torch.float32)
        if G is None:
            _ffn_ring_kernel[(16,)](x, cache, idx, bias, acc, 5, D=D, S=S, num_warps=w)
        else:
            _ffn_group_kernel[(16,)](x, cache, idx, bias, acc, 5, acc, 0, D=D, G=G, NB=S,
                                     MAXG=_table_groups(5, 16, G, S), num_warps=w)
        check(f"n=5 on 16 programs {_name(G, S, w)}", acc, ref)
    return failed


def _time_cuda():
    """CUDA-graph replay of 16 rotated launches (as bench_kernels.py times), against the library's pdl='early'."""
    from bench_kernels import ROTATE, graph_ms, peak_copy_gbps
    from kernel_floor import active_sets, opt_inputs, touched_bytes
    from real.kernels.sparse_ffn import bundled_sparse_ffn
    g = torch.Generator(device="cuda").manual_seed(0)
    caches, bias, xs = opt_inputs(g)
    peak = peak_copy_gbps()
    for n in (1638, 819, 492):
        idxs = active_sets(g, n)
        nbytes = touched_bytes(n)
        accs = [torch.zeros(1, D_MODEL, device="cuda") for _ in range(ROTATE)]
        lib = graph_ms([lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i],
                                                       pdl="early") for i in range(ROTATE)])
        print(f"n={n}: library pdl='early' {lib * 1e3:.2f} us ({100 * nbytes / lib / 1e6 / peak:.1f}% of {peak:.0f})")
        for G, S, w in CONFIGS:
            acc = torch.zeros(D_MODEL, device="cuda")
            launch(xs[0][0], caches[0], idxs[0], bias, acc, S=S, num_warps=w, G=G)
            ref = reference(xs[0][0], caches[0], idxs[0], bias)
            err = float((acc - ref).norm() / ref.norm())
            flat = [a.view(-1) for a in accs]
            for pdl in (True, False):
                ms = graph_ms([lambda i=i: launch(xs[i][0], caches[i % 4], idxs[i], bias, flat[i], S=S, num_warps=w,
                                                  pdl=pdl, G=G) for i in range(ROTATE)])
                print(f"n={n}: gluon {_name(G, S, w)} pdl={pdl}: {ms * 1e3:.2f} us "
                      f"({100 * nbytes / ms / 1e6 / peak:.1f}%), rel err {err:.1e}", flush=True)


def _time_variants():
    """Where the group kernel's time goes: each config as is, without the wait (x is static here, so still
    right), without the math (copies only), and without either; the library's pdl='early' launch beside."""
    from bench_kernels import ROTATE, graph_ms, peak_copy_gbps
    from kernel_floor import active_sets, opt_inputs, touched_bytes
    from real.kernels.sparse_ffn import bundled_sparse_ffn
    g = torch.Generator(device="cuda").manual_seed(1)
    caches, bias, xs = opt_inputs(g)
    peak = peak_copy_gbps()
    kinds = {"as is": {}, "no wait": dict(SKIP_WAIT=True), "no math": dict(SKIP_MATH=True),
             "no wait, no math": dict(SKIP_WAIT=True, SKIP_MATH=True)}
    for n in (1638, 819, 492):
        idxs = active_sets(g, n)
        nbytes = touched_bytes(n)
        accs = [torch.zeros(1, D_MODEL, device="cuda") for _ in range(ROTATE)]
        flat = [a.view(-1) for a in accs]
        lib = graph_ms([lambda i=i: bundled_sparse_ffn(xs[i], caches[i % 4], idxs[i], bias=bias, accumulate=accs[i],
                                                       pdl="early") for i in range(ROTATE)])
        print(f"variants n={n}: library pdl='early' {lib * 1e3:.2f} us ({100 * nbytes / lib / 1e6 / peak:.1f}%)")
        for G, S, w in ((2, 2, 8), (2, 3, 16), (1, 6, 8)):
            for kind, diag in kinds.items():
                acc = torch.zeros(D_MODEL, device="cuda")
                launch(xs[0][0], caches[0], idxs[0], bias, acc, S=S, num_warps=w, G=G, **diag)
                ref = reference(xs[0][0], caches[0], idxs[0], bias)
                err = float((acc - ref).norm() / ref.norm())
                ms = graph_ms([lambda i=i: launch(xs[i][0], caches[i % 4], idxs[i], bias, flat[i], S=S, num_warps=w,
                                                  G=G, **diag) for i in range(ROTATE)])
                print(f"variants n={n}: {_name(G, S, w)} {kind:<17} {ms * 1e3:6.2f} us "
                      f"({100 * nbytes / ms / 1e6 / peak:.1f}%), rel err {err:.1e}", flush=True)


def _timeline():
    """The group kernel's programs stamped (timeline_probe.py's columns and summary): do consecutive launches
    share an SM, when does each wait release after the previous launch's end, how long is the work after it."""
    from bench_kernels import ROTATE, graph_ms, peak_copy_gbps
    from kernel_floor import active_sets, opt_inputs, touched_bytes
    from timeline_probe import FIELDS, summarize
    g = torch.Generator(device="cuda").manual_seed(2)
    caches, bias, xs = opt_inputs(g)
    peak = peak_copy_gbps()
    for n in (1638, 819):
        idxs = active_sets(g, n)
        nbytes = touched_bytes(n)
        flat = [torch.zeros(D_MODEL, device="cuda") for _ in range(ROTATE)]
        for G, S, w, diag in ((2, 2, 8, {}), (2, 3, 16, {}), (2, 2, 8, dict(SKIP_WAIT=True)),
                              (2, 3, 16, dict(SKIP_WAIT=True))):
            P = _grid_size(n, "cuda")
            trace = torch.zeros(ROTATE, P, 8, dtype=torch.int64, device="cuda")
            ms = graph_ms([lambda i=i: launch(xs[i][0], caches[i % 4], idxs[i], bias, flat[i], S=S, num_warps=w, G=G,
                                              trace=(trace, i), **diag) for i in range(ROTATE)])
            summ = summarize(trace)
            name = f"{_name(G, S, w)}{' no wait' if diag else ''}"
            print(f"timeline n={n}: {name:<24} {ms * 1e3:6.2f} us {100 * nbytes / ms / 1e6 / peak:5.1f}%  " +
                  "  ".join(f"{label} {summ[key]:.2f}" for key, label in FIELDS), flush=True)


if __name__ == "__main__":
    outs = [compile_sm90(S=S, num_warps=w, G=G) for G, S, w in CONFIGS]
    ok = all(o["order_ok"] and o["stack"] == 0 for o in outs)
    if torch.cuda.is_available():
        failed = _check_cuda()
        ok = ok and not failed
        if not failed:
            if "--timeline" in sys.argv:
                _timeline()
            elif "--variants" in sys.argv:
                _time_variants()
            else:
                _time_cuda()
    sys.exit(0 if ok else 1)
