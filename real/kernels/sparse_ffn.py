"""Sparse FFN over the active neurons of a neuron cache: y = sum_r act(x.u_r + b_r) d_r, fused in Triton.

Per token only a few percent of the FFN neurons fire, so the FFN is a gather-GEMV over a few hundred rows of
the cache matrix: memory-bound, and only the bytes of the active rows should move. Methods:

* ``fused`` (the default for one token; one launch), where d_model <= 8192: the persistent whole-row kernel `_stream_kernel`.
  About #SMs x PROGS_PER_SM programs each stream a contiguous share of the active list, BLOCK_R full rows at a
  time; the next block's up/gate/down tiles and the row ids of the one after are requested before the current
  block's arithmetic (software pipelining by hand). One token: each program keeps its share of y in fp32
  registers and adds it into an fp32 accumulator with ONE vector of atomics at the end (split-K over the
  neurons); 2..16 tokens: atomics per block and token (weights still read once for all tokens). No
  [tokens, n_active] intermediate touches global memory. Wider rows: the tiled one-token kernel below, one
  launch per token.
* ``per_block`` (v1): one program per BLOCK_R active rows (whole-row tiles, or tiled over D for one token),
  atomics per program. Kept as the measured comparison.
* ``two_phase`` (the default for several tokens): kernel 1 writes h [tokens, n_active] (fp32, tiny; tensor
  cores for 2..16 tokens); kernel 2 splits the output columns and the rows over programs (few atomics; for
  several tokens h @ down runs on tensor cores as two tf32 products, `_dot_fp32_lhs`, so h keeps ~fp32
  accuracy). With several tokens the one-launch kernel spends its time in CUDA-core reductions and
  per-block, per-token atomics, not in reading weights: at batch 8 two-phase took 22.2 against 46.4 us
  (OPT-6.7B, 90%) and 22.9 against 57.5 us (Llama-2-7B), 1-7% more at 99% (H200, kernels_h200_run15.log, in git history at cd7dc41).
* ``fused_tc``: 2..16 tokens on tensor cores (tokens padded to 16, h rounded to the weight dtype before the
  second product); not used unless asked for.

All of them (the persistent kernel with one token) finish the same way (`_finish`): the last program to arrive (an atomic ticket) converts the
accumulator to the output dtype, adds the down-projection bias and zeroes the accumulator again, so no memset
or cast kernel runs before or after; the accumulator is a cached workspace per (device, stream) that every
launch leaves as it found it. Ordering: every thread fences its own atomics (fence.acq_rel.gpu) before the
barrier and the acq_rel ticket, and the last program reads the accumulator with atomic adds of zero (served by
L2). Without these (v1/v2) batch-8 outputs were wrong at OPT-6.7B shapes on the H100 (relative error 0.1-0.4,
mostly on a kernel's first call); with them all device checks pass (run 3, docs/kernels_notes.md).
Except ``accumulate=`` (the persistent and two-phase kernels): their programs add into the caller's fp32 buffer and stop,
no ticket or finish: that epilogue is ~2.2-2.4 us (H200) to ~3 us (H100) of every call at OPT-6.7B sizes
(benchmarks/probes/results/kernel_floor.txt; kernel_floor-h100.txt in git history at cd7dc41); `add_*_norm(consume=True)` reads and resets the sum.
The buffer may hold several copies of the sum ([copies, tokens, d_model]): the persistent kernel's program p adds
into copy p % copies, spreading the programs' closing atomics over more L2 lines, and the consumer adds the copies
up. A trade-off, measured (see `sparse_ffn`'s accumulate): the FFN gets faster, the consuming add+norm slower.
And the persistent and two-phase kernels with 2..16 tokens: they add into the workspace like ``accumulate=``, and a second launch
(`_drain_kernel`, T x D/1024 programs) writes y and re-zeroes it, because one last program reading T x D sums
serially was ~17 us of a 61 us call at 8 tokens (H200).

Layouts: `up`, `down` (and `gate` for Llama-style FFNs) are [n_rows, d_model] views with any strides, so the
bundled cache [n_rows, 2*d_model] (up column and down row side by side) and separate matrices both work:
see `split_bundles`. A column-strided `down` (e.g. ``fc2.weight.t()``) is correct but slow (uncoalesced).

Numerics: products and sums in fp32; h stays fp32 on the CUDA-core paths.
The order of the fp32 atomic additions varies between runs, so results vary in the last fp32 bits
(well below the fp16/bf16 output rounding).
"""

from __future__ import annotations

import torch

from real.kernels._launch import Kernel, backend_for, configs, next_pow2, pdl_args, triton

ACTIVATIONS = {"relu": 0, "relu2": 1}
METHODS = ("auto", "fused", "per_block", "two_phase", "fused_tc")
MAX_TOKENS_PER_LAUNCH = 16  # tokens per launch; more are split into launches
MAX_N_ACC = 8               # copies of the fp32 sum that programs may spread their closing atomics over
MAX_WHOLE_ROW = 8192        # widest d_model whose rows fit one register tile (the multi-token fused path)
TILE_HALVES_PER_THREAD = 256  # double-buffered weight tiles per thread: 128 registers; more spills
# two-phase h @ down for several tokens, h kept to ~fp32 accuracy either way (`_dot_fp32_lhs`): "tf32" (two
# tf32 products, no overflow guard needed) or "split" (h in two fp16 / three bf16 terms, fp16 with an overflow
# guard). tf32 was faster at every sparsity at batch 8: OPT-6.7B 76.1 vs 92.7 us at 0%, 22.1 vs 25.1 at 90%,
# 15.9 vs 16.5 at 99% (H200, 2026-12-02 15:00 UTC, kernels_h200_run13.log, in git history at cd7dc41)
DOWN_PRODUCT = "tf32"
DOWN_PRODUCTS = ("split", "tf32")


def _tiles_fit(k: int, block_r: int, block_d: int, num_warps: int) -> bool:
    """The persistent kernel's two blocks in flight (k matrices of block_r x block_d halves each) fit the
    register budget of num_warps warps."""
    return 2 * k * block_r * block_d <= TILE_HALVES_PER_THREAD * 32 * num_warps


# ----------------------------------------------------------------------------------------------------------
# plain-torch reference (also the CPU fallback)
# ----------------------------------------------------------------------------------------------------------
def _activate_torch(z: torch.Tensor, activation: str) -> torch.Tensor:
    z = torch.relu(z)
    return z * z if activation == "relu2" else z


def sparse_ffn_reference(x, up, down, idx=None, *, gate=None, bias=None, down_bias=None, activation="relu",
                         count=None, out_dtype=None):
    """The same function as `sparse_ffn` in plain torch; computes in fp32 (float64 if the inputs are float64)
    and returns x's dtype, or ``out_dtype``.

    With `count` (a device tensor), reads it on the host: a synchronisation, fine for a fallback.
    """
    _check_activation(activation)
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    work = torch.promote_types(x.dtype, torch.float32)
    if idx is not None and count is not None:
        idx = idx[: int(count.reshape(-1)[0])]
    rows = (lambda m: m) if idx is None else (lambda m: m.index_select(0, idx.long()))
    xw = x2.to(work)
    z = xw @ rows(up).to(work).T
    if gate is not None:
        h = _activate_torch(xw @ rows(gate).to(work).T, activation) * z
    else:
        if bias is not None:
            z = z + rows(bias.reshape(-1, 1)).reshape(-1).to(work)
        h = _activate_torch(z, activation)
    y = h @ rows(down).to(work)
    if down_bias is not None:
        y = y + down_bias.to(work)
    y = y.to(out_dtype or x.dtype)
    return y.reshape(-1) if squeeze else y


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _activate(z, ACT: tl.constexpr):
        z = tl.maximum(z, 0.0)
        if ACT == 1:
            z = z * z
        return z

    @triton.jit
    def _row_ids(idx_ptr, offs, rmask, HAS_IDX: tl.constexpr):
        """Cache row ids (int64) of active-list positions ``offs``: idx[offs], or the positions themselves."""
        if HAS_IDX:
            return tl.load(idx_ptr + offs, mask=rmask, other=0).to(tl.int64)
        return offs.to(tl.int64)

    @triton.jit
    def _active_rows(idx_ptr, count_ptr, n_active, start, HAS_IDX: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr,
                     BLOCK_R: tl.constexpr):
        """(row ids as int64, mask, n): rows start..start+BLOCK_R of the active list, n active rows in all."""
        n = n_active
        if COUNT_ON_DEVICE:
            n = tl.minimum(tl.load(count_ptr), n_active)
        offs = start + tl.arange(0, BLOCK_R)
        rmask = offs < n
        return _row_ids(idx_ptr, offs, rmask, HAS_IDX), rmask, n

    @triton.jit
    def _gate_bias_act(zu, zg, b, keep, GATED: tl.constexpr, ACT: tl.constexpr):
        """h = act(zg) * zu (gated) or act(zu + b); 0 where not keep. Shapes broadcast (1-D rows or 2-D)."""
        if GATED:
            h = _activate(zg, ACT) * zu
        else:
            h = _activate(zu + b, ACT)
        return tl.where(keep, h, 0.0)

    @triton.jit
    def _row_bias(bias_ptr, rows, rmask, HAS_BIAS: tl.constexpr):
        b = 0.0
        if HAS_BIAS:
            b = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        return b

    @triton.jit
    def _hidden_one(x_ptr, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask, D,
                    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """One token, tiled over D: h [BLOCK_R] fp32. Elementwise products go into a [BLOCK_R, BLOCK_D]
        accumulator and are reduced once at the end. h stays a 1-D vector in the tile's row layout, so
        h[:, None] * down_tile needs no layout conversion of the (large) down tile."""
        offs_d = tl.arange(0, BLOCK_D)
        acc_u = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        acc_g = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            dmask = d < D
            m = rmask[:, None] & dmask[None, :]
            xv = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            u = tl.load(up_ptr + rows[:, None] * s_ur + d[None, :] * s_ud, mask=m, other=0.0)
            acc_u += u.to(tl.float32) * xv
            if GATED:
                g = tl.load(gate_ptr + rows[:, None] * s_gr + d[None, :] * s_gd, mask=m, other=0.0)
                acc_g += g.to(tl.float32) * xv
        zu = tl.sum(acc_u, axis=1)
        zg = zu
        if GATED:
            zg = tl.sum(acc_g, axis=1)
        return _gate_bias_act(zu, zg, _row_bias(bias_ptr, rows, rmask, HAS_BIAS), rmask, GATED, ACT)

    @triton.jit
    def _hidden_tc(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask, T, D,
                   HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """2..16 tokens on tensor cores (tokens padded to BLOCK_T): h [BLOCK_T, BLOCK_R] fp32."""
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        zu = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
        zg = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            dmask = d < D
            m = rmask[:, None] & dmask[None, :]
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + d[None, :], mask=tmask[:, None] & dmask[None, :],
                         other=0.0)
            u = tl.load(up_ptr + rows[:, None] * s_ur + d[None, :] * s_ud, mask=m, other=0.0)
            zu = tl.dot(xt, tl.trans(u), zu)
            if GATED:
                g = tl.load(gate_ptr + rows[:, None] * s_gr + d[None, :] * s_gd, mask=m, other=0.0)
                zg = tl.dot(xt, tl.trans(g), zg)
        b = _row_bias(bias_ptr, rows, rmask, HAS_BIAS)
        if HAS_BIAS:
            b = b[None, :]
        return _gate_bias_act(zu, zg, b, rmask[None, :], GATED, ACT)

    @triton.jit
    def _release_fence(anchor, FENCE: tl.constexpr):
        """fence.acq_rel.gpu in every thread (CUDA's __threadfence): the thread's own accumulator atomics are
        visible GPU-wide before the barrier and the ticket. Compiled kernels only (the interpreter runs programs
        one after another and has no inline assembly)."""
        if FENCE:
            tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [anchor], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _finish(acc_ptr, sem_ptr, y_ptr, stride_yt, out_bias_ptr, T, D, HAS_OUT_BIAS: tl.constexpr,
                BLOCK_E: tl.constexpr, N_ACC: tl.constexpr, FENCE: tl.constexpr):
        """Ticket: the last program to arrive writes y = acc (+ bias) in y's dtype and re-zeroes acc and the ticket.
        With N_ACC > 1 the accumulator has N_ACC copies [N_ACC, T, D] that are summed here.

        Ordering, as in CUDA's threadFenceReduction sample: every thread fences its own atomics (release), a
        barrier, then one acq_rel atomic on the ticket. The last program reads the accumulator with atomic adds of
        zero: they are served by L2, where the atomics landed, and cannot be hoisted above the ticket; then it
        stores zeros for the next launch.
        """
        _release_fence(tl.program_id(0), FENCE)
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.debug_barrier()
            offs = tl.arange(0, BLOCK_E)
            for t in range(0, T):
                for d0 in range(0, D, BLOCK_E):
                    d = d0 + offs
                    m = d < D
                    zero = tl.zeros([BLOCK_E], tl.float32)
                    v = zero
                    for k in tl.static_range(N_ACC):
                        a = acc_ptr + (k * T + t) * D + d
                        v += tl.atomic_add(a, zero, mask=m, sem="relaxed")  # a read served by L2
                        tl.store(a, zero, mask=m)
                    if HAS_OUT_BIAS:
                        v += tl.load(out_bias_ptr + d, mask=m, other=0.0).to(tl.float32)
                    tl.store(y_ptr + t * stride_yt + d, v.to(y_ptr.dtype.element_ty), mask=m)
            tl.atomic_xchg(sem_ptr, 0)

    DRAIN_BLOCK = 1024

    @triton.jit
    def _drain_kernel(acc_ptr, y_ptr, stride_yt, D, BLOCK: tl.constexpr):
        """y[t] = acc[t] in y's dtype, and acc[t] = 0 again: the finish of a several-token launch, one program
        per token and BLOCK columns (plain loads: the kernel boundary orders them after the accumulating
        launch's atomics)."""
        t = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = d < D
        v = tl.load(acc_ptr + t * D + d, mask=m, other=0.0)
        tl.store(y_ptr + t * stride_yt + d, v.to(y_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()   # all reads before any zeroing: the two may map elements to threads differently
        tl.store(acc_ptr + t * D + d, tl.zeros([BLOCK], tl.float32), mask=m)

    @triton.jit(do_not_specialize=["n_active", "n_bucket", "T"])
    def _fused_kernel(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd,
                      bias_ptr, out_bias_ptr, idx_ptr, count_ptr, n_active, acc_ptr, sem_ptr, y_ptr, stride_yt,
                      T, D, n_bucket,
                      HAS_IDX: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_OUT_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      WHOLE_ROW: tl.constexpr, FENCE: tl.constexpr):
        pid = tl.program_id(0)
        rows, rmask, n = _active_rows(idx_ptr, count_ptr, n_active, pid * BLOCK_R, HAS_IDX, COUNT_ON_DEVICE,
                                      BLOCK_R)
        if WHOLE_ROW:
            # whole rows (BLOCK_D >= D), CUDA cores, 1..BLOCK_T tokens: the up, gate and down tiles are all
            # requested before any arithmetic, so a program waits for memory about twice (index, then
            # weights) instead of once per D-chunk per phase; each token then reuses the tiles in registers
            if pid * BLOCK_R < n:
                d = tl.arange(0, BLOCK_D)
                dmask = d < D
                u, g, dn, b = _whole_tiles(up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd,
                                           bias_ptr, rows, rmask, d, dmask, HAS_BIAS, GATED)
                for t in tl.static_range(BLOCK_T):
                    if t < T:
                        xv = tl.load(x_ptr + t * stride_xt + d, mask=dmask, other=0.0).to(tl.float32)
                        c = _whole_contrib(xv, u, g, dn, b, rmask, GATED, ACT)
                        tl.atomic_add(acc_ptr + t * D + d, c, mask=dmask, sem="relaxed")
        elif BLOCK_T == 1:
            if pid * BLOCK_R < n:
                h = _hidden_one(x_ptr, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask, D,
                                HAS_BIAS, GATED, ACT, BLOCK_R, BLOCK_D)
                offs_d = tl.arange(0, BLOCK_D)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + offs_d
                    dmask = d < D
                    dn = tl.load(down_ptr + rows[:, None] * s_dr + d[None, :] * s_dd,
                                 mask=rmask[:, None] & dmask[None, :], other=0.0)
                    c = tl.sum(dn.to(tl.float32) * h[:, None], axis=0)
                    tl.atomic_add(acc_ptr + d, c, mask=dmask, sem="relaxed")
        else:
            if pid * BLOCK_R < n:
                h = _hidden_tc(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask,
                               T, D, HAS_BIAS, GATED, ACT, BLOCK_T, BLOCK_R, BLOCK_D)
                offs_t = tl.arange(0, BLOCK_T)
                offs_d = tl.arange(0, BLOCK_D)
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + offs_d
                    dmask = d < D
                    dn = tl.load(down_ptr + rows[:, None] * s_dr + d[None, :] * s_dd,
                                 mask=rmask[:, None] & dmask[None, :], other=0.0)
                    c = tl.dot(h.to(dn.dtype), dn)
                    tl.atomic_add(acc_ptr + offs_t[:, None] * D + d[None, :], c,
                                  mask=(offs_t < T)[:, None] & dmask[None, :], sem="relaxed")
        _finish(acc_ptr, sem_ptr, y_ptr, stride_yt, out_bias_ptr, T, D, HAS_OUT_BIAS, BLOCK_E, 1, FENCE)

    @triton.jit
    def _whole_tiles(up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd, bias_ptr, rows, rmask, d,
                     dmask, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
        """Request the up, gate and down tiles and the biases of whole rows (no arithmetic: the loads stay in
        flight until first use)."""
        m = rmask[:, None] & dmask[None, :]
        u = tl.load(up_ptr + rows[:, None] * s_ur + d[None, :] * s_ud, mask=m, other=0.0)
        dn = tl.load(down_ptr + rows[:, None] * s_dr + d[None, :] * s_dd, mask=m, other=0.0)
        g = u
        if GATED:
            g = tl.load(gate_ptr + rows[:, None] * s_gr + d[None, :] * s_gd, mask=m, other=0.0)
        return u, g, dn, _row_bias(bias_ptr, rows, rmask, HAS_BIAS)

    @triton.jit
    def _whole_contrib(xv, u, g, dn, b, rmask, GATED: tl.constexpr, ACT: tl.constexpr):
        """One token's share of y from whole-row tiles: sum_r act(x.u_r + b_r) dn_r, fp32 [BLOCK_D]."""
        zu = tl.sum(u.to(tl.float32) * xv[None, :], axis=1)
        zg = zu
        if GATED:
            zg = tl.sum(g.to(tl.float32) * xv[None, :], axis=1)
        h = _gate_bias_act(zu, zg, b, rmask, GATED, ACT)
        return tl.sum(dn.to(tl.float32) * h[:, None], axis=0)

    @triton.jit(do_not_specialize=["n_active", "n_bucket", "T"])
    def _stream_kernel(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd,
                       bias_ptr, out_bias_ptr, idx_ptr, count_ptr, n_active, acc_ptr, sem_ptr, y_ptr, stride_yt,
                       T, D, n_bucket,
                       HAS_IDX: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_OUT_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       N_ACC: tl.constexpr, PROGS_PER_SM: tl.constexpr, FENCE: tl.constexpr,
                       FINISH: tl.constexpr = True, PDL: tl.constexpr = 0):
        """Persistent-style whole-row kernel: a grid of about #SMs x PROGS_PER_SM programs, each streaming a
        contiguous share of the active list BLOCK_R rows at a time. Software-pipelined by hand: the tiles of the
        next block and the row ids of the one after are requested before the current block's arithmetic, so
        each program keeps a block of weights in flight. (Requesting the block after next right after a block's
        arithmetic instead, the same order on paper, made most launches 0.8-3 us slower at 90-95%: H200,
        2026-12-02 14:41 UTC, kernel_floor_h200_run8.log, in git history at cd7dc41.) One token: y's share stays in fp32 registers and is
        flushed with ONE vector of atomics per program, into accumulator copy pid % N_ACC (spreads the flush
        over more L2 lines); 2..16 tokens: atomics per block and token. Needs BLOCK_D >= D.
        FINISH=False (``sparse_ffn(accumulate=...)``): acc_ptr is the caller's fp32 [N_ACC, T, D] (its copies);
        the programs only add into them (program 0 adds the down bias into copy 0) and no epilogue runs.
        PDL (launched with programmatic dependent launch) 1: let the next kernel launch now, then wait for the
        previous one to finish and flush before reading anything (x, the index, the count, the accumulator);
        2 (one token, count from the host): request the row ids of the first three blocks and the weight tiles
        of the first two before that wait, so they stream while the previous kernel finishes; x and the rest
        only after it. Two blocks is what the loop holds anyway (the current block, and the next one in
        flight), so the early requests cost no registers."""
        tl.static_assert(PDL != 2 or BLOCK_T == 1, "PDL 2 (pdl='early') takes one token")
        tl.static_assert(PDL != 2 or not COUNT_ON_DEVICE, "PDL 2 (pdl='early') reads the count before the wait")
        if PDL > 0:
            gdc_launch_dependents()
        if PDL == 1:
            gdc_wait()
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        n = n_active
        if COUNT_ON_DEVICE:
            n = tl.minimum(tl.load(count_ptr), n_active)
        n_blk = tl.cdiv(n, BLOCK_R)
        start = ((pid * n_blk) // G) * BLOCK_R  # balanced: shares differ by at most one block
        end = tl.minimum((((pid + 1) * n_blk) // G) * BLOCK_R, n)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        offs = tl.arange(0, BLOCK_R)
        acc_out = acc_ptr + (pid % N_ACC) * T * D
        if PDL != 2:
            x0 = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_D], tl.float32)
        # prologue: row ids of blocks 0 and 1, tiles of block 0
        m_cur = start + offs < end
        rows_cur = _row_ids(idx_ptr, start + offs, m_cur, HAS_IDX)
        m_nxt = start + BLOCK_R + offs < end
        rows_nxt = _row_ids(idx_ptr, start + BLOCK_R + offs, m_nxt, HAS_IDX)
        u, g, dn, b = _whole_tiles(up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd, bias_ptr,
                                   rows_cur, m_cur, d, dmask, HAS_BIAS, GATED)
        first = start
        if PDL == 2:
            # block 1 too (and the row ids of block 2) before the wait; block 0 is computed here, peeled, and
            # the loop goes on from block 1 exactly as below
            m_far = start + 2 * BLOCK_R + offs < end
            rows_far = _row_ids(idx_ptr, start + 2 * BLOCK_R + offs, m_far, HAS_IDX)
            u_n, g_n, dn_n, b_n = _whole_tiles(up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd,
                                               bias_ptr, rows_nxt, m_nxt, d, dmask, HAS_BIAS, GATED)
            gdc_wait()
            x0 = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            part = _whole_contrib(x0, u, g, dn, b, m_cur, GATED, ACT)   # one token: PDL 2 needs BLOCK_T 1
            u, g, dn, b, m_cur = u_n, g_n, dn_n, b_n, m_nxt
            rows_nxt, m_nxt = rows_far, m_far
            first = start + BLOCK_R
        for r0 in range(first, end, BLOCK_R):
            m_far = r0 + 2 * BLOCK_R + offs < end
            rows_far = _row_ids(idx_ptr, r0 + 2 * BLOCK_R + offs, m_far, HAS_IDX)
            u_n, g_n, dn_n, b_n = _whole_tiles(up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, down_ptr, s_dr, s_dd,
                                               bias_ptr, rows_nxt, m_nxt, d, dmask, HAS_BIAS, GATED)
            if BLOCK_T == 1:
                part += _whole_contrib(x0, u, g, dn, b, m_cur, GATED, ACT)
            else:
                for t in tl.static_range(BLOCK_T):
                    if t < T:
                        xv = tl.load(x_ptr + t * stride_xt + d, mask=dmask, other=0.0).to(tl.float32)
                        c = _whole_contrib(xv, u, g, dn, b, m_cur, GATED, ACT)
                        tl.atomic_add(acc_out + t * D + d, c, mask=dmask, sem="relaxed")
            u, g, dn, b, m_cur = u_n, g_n, dn_n, b_n, m_nxt
            rows_nxt, m_nxt = rows_far, m_far
        if BLOCK_T == 1:
            if start < end:
                tl.atomic_add(acc_out + d, part, mask=dmask, sem="relaxed")
        if FINISH:
            _finish(acc_ptr, sem_ptr, y_ptr, stride_yt, out_bias_ptr, T, D, HAS_OUT_BIAS, BLOCK_E, N_ACC, FENCE)
        elif HAS_OUT_BIAS:
            if pid == 0:
                ob = tl.load(out_bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
                for t in range(0, T):
                    tl.atomic_add(acc_ptr + t * D + d, ob, mask=dmask, sem="relaxed")

    @triton.jit(do_not_specialize=["n_active", "n_bucket", "T"])
    def _hidden_kernel(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, idx_ptr, count_ptr,
                       n_active, h_ptr, T, D, n_bucket,
                       HAS_IDX: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows, rmask, n = _active_rows(idx_ptr, count_ptr, n_active, pid * BLOCK_R, HAS_IDX, COUNT_ON_DEVICE,
                                      BLOCK_R)
        offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        if pid * BLOCK_R < n:
            if BLOCK_T == 1:
                h1 = _hidden_one(x_ptr, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask, D,
                                 HAS_BIAS, GATED, ACT, BLOCK_R, BLOCK_D)
                tl.store(h_ptr + offs_r, h1, mask=rmask)
            else:
                h = _hidden_tc(x_ptr, stride_xt, up_ptr, s_ur, s_ud, gate_ptr, s_gr, s_gd, bias_ptr, rows, rmask,
                               T, D, HAS_BIAS, GATED, ACT, BLOCK_T, BLOCK_R, BLOCK_D)
                offs_t = tl.arange(0, BLOCK_T)
                tl.store(h_ptr + offs_t[:, None] * n_active + offs_r[None, :], h,
                         mask=(offs_t < T)[:, None] & rmask[None, :])

    @triton.jit
    def _dot_fp32_lhs(h, w, acc, TF32: tl.constexpr = False):
        """acc + h @ w on tensor cores with h kept to ~fp32 accuracy, instead of one rounding of h to w's dtype
        (2^-11 / 2^-8). TF32: w (fp16/bf16) is exact in tf32, and h = hb + (h - hb) with hb its top 11
        significant bits (exact in tf32, by masking) and the rest rounded to tf32 (dropped: ~2^-21 of h): two
        tf32 products, fp32's range, so no overflow guard. Otherwise h is split into terms of w's dtype, each
        multiplied exactly by w. bf16: h = hi + mid + lo (what is dropped is below 2^-24 of h). fp16:
        h = hi + mid / 2048, mid scaled into fp16's normal range (dropped: ~2^-22 of h); a tile with |h| >= 2^15
        is first divided by 2^16 (exact), so hi cannot overflow to inf."""
        if TF32:
            w32 = w.to(tl.float32)
            hb = (h.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            acc = tl.dot(hb, w32, acc, input_precision="tf32")
            acc = tl.dot(h - hb, w32, acc, input_precision="tf32")
        elif w.dtype == tl.float16:
            scale = tl.where(tl.max(tl.abs(h)) >= 32768.0, 65536.0, 1.0)
            hs = h / scale
            hi = hs.to(tl.float16)
            mid = ((hs - hi.to(tl.float32)) * 2048.0).to(tl.float16)
            acc += (tl.dot(hi, w) + tl.dot(mid, w) * (1.0 / 2048.0)) * scale
        else:
            hi = h.to(w.dtype)
            rest = h - hi.to(tl.float32)
            mid = rest.to(w.dtype)
            acc = tl.dot(hi, w, acc)
            acc = tl.dot(mid, w, acc)
            acc = tl.dot((rest - mid.to(tl.float32)).to(w.dtype), w, acc)
        return acc

    @triton.jit(do_not_specialize=["n_active", "n_bucket", "T"])
    def _down_kernel(h_ptr, down_ptr, s_dr, s_dd, out_bias_ptr, idx_ptr, count_ptr, n_active, acc_ptr, sem_ptr,
                     y_ptr, stride_yt, T, D, n_bucket,
                     HAS_IDX: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr, HAS_OUT_BIAS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     FENCE: tl.constexpr, FINISH: tl.constexpr = True, TF32: tl.constexpr = False):
        """Program (column block, row split): sum over its share of the rows of h[:, r] * down[r, cols].
        FINISH=False (several tokens): only add into acc (the row-split-0 programs add the down bias); a drain
        launch writes y."""
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = n_active
        if COUNT_ON_DEVICE:
            n = tl.minimum(tl.load(count_ptr), n_active)
        chunk = tl.cdiv(tl.cdiv(n, tl.num_programs(1)), BLOCK_R) * BLOCK_R
        start = pid_s * chunk
        end = tl.minimum(start + chunk, n)
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        if start < end:
            acc1 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for r0 in range(start, end, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                rmask = offs_r < end
                rows = _row_ids(idx_ptr, offs_r, rmask, HAS_IDX)
                dn = tl.load(down_ptr + rows[:, None] * s_dr + d[None, :] * s_dd,
                             mask=rmask[:, None] & dmask[None, :], other=0.0)
                if BLOCK_T == 1:
                    h1 = tl.load(h_ptr + offs_r, mask=rmask, other=0.0)
                    acc1 += dn.to(tl.float32) * h1[:, None]
                else:
                    h = tl.load(h_ptr + offs_t[:, None] * n_active + offs_r[None, :],
                                mask=tmask[:, None] & rmask[None, :], other=0.0)
                    acc = _dot_fp32_lhs(h, dn, acc, TF32)
            if BLOCK_T == 1:
                tl.atomic_add(acc_ptr + d, tl.sum(acc1, axis=0), mask=dmask, sem="relaxed")
            else:
                tl.atomic_add(acc_ptr + offs_t[:, None] * D + d[None, :], acc, mask=tmask[:, None] & dmask[None, :],
                              sem="relaxed")
        if FINISH:
            _finish(acc_ptr, sem_ptr, y_ptr, stride_yt, out_bias_ptr, T, D, HAS_OUT_BIAS, BLOCK_E, 1, FENCE)
        elif HAS_OUT_BIAS:
            if pid_s == 0:
                ob = tl.load(out_bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
                tl.atomic_add(acc_ptr + offs_t[:, None] * D + d[None, :], tl.broadcast_to(ob[None, :], [BLOCK_T, BLOCK_D]),
                              mask=tmask[:, None] & dmask[None, :], sem="relaxed")

    # (BLOCK_R, BLOCK_D, num_warps, num_stages); "one": one token (CUDA cores), "dot": 2..16 tokens (tensor cores)
    _ROWS_ONE = [(4, 1024, 4, 3), (8, 1024, 8, 3)]
    _ROWS_DOT = [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 8, 3),
                 (64, 64, 4, 4)]
    # whole-row tiles; pruned to those with D <= BLOCK_D < 2 D
    _WHOLE_ONE = [(2, 4096, 4, 1), (2, 4096, 8, 1), (4, 4096, 8, 1), (2, 8192, 8, 1), (4, 8192, 8, 1)]
    _WHOLE_MULTI = [(1, 4096, 4, 1), (2, 4096, 8, 1), (4, 4096, 8, 1), (1, 8192, 8, 1), (2, 8192, 8, 1)]
    _DOWN_ONE = [(16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 512, 4, 3), (32, 512, 8, 3),
                 (64, 256, 8, 3)]
    _DOWN_DOT = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 8, 3), (16, 256, 4, 4)]
    _NAMES = ("BLOCK_R", "BLOCK_D")
    _KEY = ["D", "n_bucket", "BLOCK_T", "HAS_IDX", "COUNT_ON_DEVICE"]
    _DEFAULT = {"one": {"BLOCK_R": 16, "BLOCK_D": 64}, "dot": {"BLOCK_R": 16, "BLOCK_D": 32}}
    _FUSED_DEFAULT = {"one": {"BLOCK_R": 16, "BLOCK_D": 64, "WHOLE_ROW": False},
                      "multi": {"BLOCK_R": 2, "BLOCK_D": 256, "WHOLE_ROW": True},
                      "dot": {"BLOCK_R": 16, "BLOCK_D": 32, "WHOLE_ROW": False}}

    def _fused_configs(rows, whole):
        out = configs(rows, _NAMES)
        for c in out:
            c.kwargs["WHOLE_ROW"] = whole
        return out

    def _prune_whole_rows(configs_, named_args, **kwargs):
        """Whole-row configs only where a row fits one tile (D <= BLOCK_D < 2 D); keep at least one config."""
        D = named_args["D"]
        kept = [c for c in configs_ if not c.kwargs.get("WHOLE_ROW") or D <= c.kwargs["BLOCK_D"] < 2 * D]
        return kept or configs_[:1]

    FUSED = Kernel(_fused_kernel,
                   {"one": _fused_configs(_ROWS_ONE, False) + _fused_configs(_WHOLE_ONE, True),
                    "multi": _fused_configs(_WHOLE_MULTI, True),
                    "dot": _fused_configs(_ROWS_DOT, False)},
                   _FUSED_DEFAULT, _KEY + ["GATED"],
                   prune=_prune_whole_rows)
    # persistent whole-row kernel: (BLOCK_R, BLOCK_D, N_ACC, PROGS_PER_SM, num_warps, num_stages)
    _STREAM_NAMES = ("BLOCK_R", "BLOCK_D", "N_ACC", "PROGS_PER_SM")
    _STREAM_ONE = [(2, 4096, 1, 2, 8, 1), (2, 4096, 1, 1, 8, 1), (1, 4096, 1, 4, 4, 1), (1, 4096, 1, 2, 8, 1),
                   (4, 4096, 1, 1, 8, 1), (2, 4096, 1, 1, 16, 1), (1, 8192, 1, 2, 8, 1), (2, 8192, 1, 1, 8, 1)]
    _STREAM_MULTI = [(1, 4096, 1, 4, 4, 1), (2, 4096, 1, 2, 8, 1), (4, 4096, 1, 1, 8, 1), (1, 8192, 1, 2, 8, 1),
                     (2, 8192, 1, 1, 8, 1)]
    _STREAM_DEFAULT = {m: {"BLOCK_R": 2, "BLOCK_D": 256, "N_ACC": 2, "PROGS_PER_SM": 1} for m in ("one", "multi")}
    def _prune_stream(configs_, named_args, **kwargs):
        """A row must fit one tile (D <= BLOCK_D < 2 D), and the double-buffered tiles must fit the registers."""
        D, k = named_args["D"], 3 if kwargs.get("GATED", named_args.get("GATED")) else 2
        kept = [c for c in configs_ if D <= c.kwargs["BLOCK_D"] < 2 * D
                and _tiles_fit(k, c.kwargs["BLOCK_R"], c.kwargs["BLOCK_D"], c.num_warps)]
        return kept or [min(configs_, key=lambda c: c.kwargs["BLOCK_R"] * abs(c.kwargs["BLOCK_D"] - D))]

    # modes "one_acc"/"multi_acc": the same configs tuned on accumulating launches (no epilogue, so the
    # best grid can differ), with an autotuner of their own (FINISH is not among the autotuner's keys).
    # Several tokens always take the accumulating launch + drain, so "multi" is only a default (interpreter).
    STREAM = Kernel(_stream_kernel, {"one": configs(_STREAM_ONE, _STREAM_NAMES),
                                     "one_acc": configs(_STREAM_ONE, _STREAM_NAMES),
                                     "multi_acc": configs(_STREAM_MULTI, _STREAM_NAMES)},
                    {**_STREAM_DEFAULT, **{m + "_acc": _STREAM_DEFAULT[m] for m in _STREAM_DEFAULT}},
                    _KEY + ["GATED"], prune=_prune_stream)
    HIDDEN = Kernel(_hidden_kernel, {"one": configs(_ROWS_ONE + [(2, 4096, 4, 1), (4, 4096, 8, 1)], _NAMES), "dot": configs(_ROWS_DOT, _NAMES)},
                    _DEFAULT, _KEY + ["GATED"])
    # restore_value: with FINISH=False (several tokens, or accumulate=) the programs only add into acc, so every
    # tuning run must leave it as it found it: the workspace's zeros, or a caller's sum
    DOWN = Kernel(_down_kernel, {"one": configs(_DOWN_ONE, _NAMES), "dot": configs(_DOWN_DOT, _NAMES)},
                  _DEFAULT, _KEY + ["TF32"], restore_value=["acc_ptr"])


# ----------------------------------------------------------------------------------------------------------
# workspace: an fp32 accumulator and a ticket, all zeros between launches (the kernels restore them)
# ----------------------------------------------------------------------------------------------------------
_WORKSPACES: dict = {}
# as Triton's own driver does: the C++ accessor where this torch build has it (CUDA builds)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda index: torch.cuda.current_stream(index).cuda_stream)


def _workspace(device: torch.device, numel: int):
    """Cached per (device, stream): launches on one stream run in order, so they may share it; launches on
    concurrent streams get their own."""
    # the raw stream handle: torch.cuda.current_stream() builds a Python Stream object per call (host time on
    # the engine's critical path); device is a tensor's, so it has an index
    stream = _raw_stream(device.index) if device.type == "cuda" else 0
    key = (str(device), stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws[0].numel() < numel:
        ws = (torch.zeros(max(numel, 1 << 16), dtype=torch.float32, device=device),
              torch.zeros(1, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {activation!r}. Fix: use one of {sorted(ACTIVATIONS)} "
                         "(the flash method needs exact zeros)")


def _check(x, up, down, idx, gate, bias, down_bias, count, method):
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected [d_model] or [tokens, d_model], got shape {tuple(x.shape)}")
    d_model = x.shape[-1]
    for name, m in (("up", up), ("down", down), ("gate", gate)):
        if m is None:
            continue
        if m.dim() != 2 or m.shape[1] != d_model or m.shape[0] != up.shape[0]:
            raise ValueError(f"{name}: expected [n_rows={up.shape[0]}, d_model={d_model}], got {tuple(m.shape)}. "
                             "Fix: pass row-per-neuron views (see split_bundles); transpose fc2-style weights")
        if m.dtype != x.dtype or m.device != x.device:
            raise ValueError(f"{name}: dtype/device {m.dtype}/{m.device} differs from x's {x.dtype}/{x.device}. "
                             "Fix: cast x to the weights' dtype and device")
    if gate is not None and bias is not None:
        raise ValueError("bias: the gated (Llama-style) variant takes no per-neuron bias. Fix: pass bias=None")
    if bias is not None and bias.shape != (up.shape[0],):
        raise ValueError(f"bias: expected [n_rows={up.shape[0]}], got {tuple(bias.shape)}")
    if down_bias is not None and down_bias.shape != (d_model,):
        raise ValueError(f"down_bias: expected [d_model={d_model}], got {tuple(down_bias.shape)}")
    if idx is not None and (idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"idx: expected a 1-D int32/int64 tensor of row numbers, got {idx.dtype} "
                         f"shape {tuple(idx.shape)}")
    if count is not None and (idx is None or count.numel() != 1 or count.dtype != torch.int32):
        raise ValueError("count: expected a 1-element int32 tensor together with idx (as predict_active returns)")
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}. Fix: use one of {METHODS}")


def sparse_ffn(x, up, down, idx=None, *, gate=None, bias=None, down_bias=None, activation="relu", count=None,
               method="auto", impl="auto", config=None, out=None, accumulate=None, pdl=False):
    """y = sum over active rows r of act(x . up[r] + bias[r]) * down[r] (+ down_bias); gated: act(x.gate[r]) * (x.up[r]).

    x: [d_model] or [tokens, d_model] (fp16/bf16, same dtype as the weights); up, down, gate: [n_rows, d_model]
    views; idx: active row numbers (int32/int64, on x's device; values are not range-checked on the device),
    or None for all rows; count: optional int32 [1] device tensor (from predict_active) -- then only
    idx[:count] is used and nothing is read back to the host; bias: [n_rows] per-neuron up bias (indexed by
    the same rows); down_bias: [d_model] added once. Returns y with x's shape and dtype.
    method: 'auto' (default): 'fused' for one token, and wherever `config` or `pdl` is given;
    'two_phase' for several tokens (H200, batch 8: 2.1-4.6x faster than 'fused' at 0-90% sparsity, 1-7%
    slower at 99%; kernels_h200_run15.log, in git history at cd7dc41). 'fused': the persistent whole-row kernel where d_model <= 8192; 'per_block' (v1:
    one program per row block); 'two_phase' (h [tokens, n_active] on tensor cores, then h @ down split over
    columns and rows); 'fused_tc' (experimental tensor-core path, see module doc).
    impl: 'auto' (Triton on CUDA, interpreter on CPU under TRITON_INTERPRET=1, else torch), 'torch', 'triton'.
    config: fixed block sizes instead of autotuning (tests): 'fused' takes {'BLOCK_R', 'BLOCK_D' >= d_model,
    'N_ACC' (copies of the fp32 sum: one token only, several tokens use one; with accumulate= the buffer's copies set it), 'PROGS_PER_SM'}, the others {'BLOCK_R', 'BLOCK_D', 'WHOLE_ROW' (per_block/fused_tc)}; all may add
    'num_warps', 'num_stages'.
    out: optional preallocated result (x's shape, dtype and device, contiguous; at most 16 tokens), so that a
    call allocates nothing (the accumulator is a cached workspace).
    accumulate: optional float32 tensor of x's shape (contiguous, at most 16 tokens; method 'fused' with
    d_model <= 8192, or 'two_phase'): y (+ down_bias) is ADDED into it in fp32 and it is returned. Launches
    whose programs only add, with no epilogue (no ticket, cast or re-zeroing): the caller owns the sum, e.g. several calls
    (resident and new rows) add into one buffer and the next fused op reads and resets it. It may also be
    [copies, *x.shape] (copies <= 8): the sum of the copies is what is added; 'fused' spreads its programs
    over them (program p adds into copy p % copies: fewer atomics on each L2 line), 'two_phase' adds into copy
    0; `add_*_norm(consume=True)` takes such a buffer as it is. A trade-off: at OPT-6.7B batch 1 (H200,
    2026-12-02 18:04 UTC, benchmarks/probes/results/atomic_spread_probe.txt) the pdl='early' FFN took 9.80 / 9.58 / 9.47 us
    with 1 / 2 / 4 copies at 90% (6.08 / 5.72 / 5.66 at 95%, 5.25 / 4.49 / 4.22 at 97%), but the consuming
    add+norm, one program per token, 1.98 / 2.45 / 3.23 us, so the pair was fastest with one copy except at
    97% (7.32 / 6.88 / 7.58 us). One copy (x's shape) is the default to allocate. (A mismatch seen once
    with 2 copies was a race in the consuming add+norm, fixed 2026-12-02: docs/kernels.md.)
    pdl: launch with programmatic dependent launch (CUDA, method 'fused', d_model <= 8192): the launch may
    start while the stream's previous kernel finishes, and its programs wait for that kernel (griddepcontrol)
    before reading anything, so it is safe after any kernel; it hides launch latency only. pdl='early'
    (one token, count None) also requests each program's first two blocks of weight rows (and their row ids) before
    that wait, so they stream while the previous kernel finishes: only when no kernel that may still be
    running writes `up`, `down`, `gate`, `bias` or `idx` (a launch without PDL, a copy from the host, or a
    sync between the cache insert and this call). x is read only after the wait.
    """
    _check_activation(activation)
    _check(x, up, down, idx, gate, bias, down_bias, count, method)
    if method == "auto":
        several = x.dim() == 2 and x.shape[0] > 1
        wide_sum = accumulate is not None and x.shape[-1] > MAX_WHOLE_ROW    # 'fused' cannot accumulate those
        method = "two_phase" if (several or wide_sum) and config is None and not pdl else "fused"
    copies = 1
    if accumulate is not None:
        copies = _check_accumulate(x, accumulate, method, out)
    _check_pdl(pdl, x, idx, count, method)
    backend = backend_for(x, impl)
    if backend == "torch":
        if accumulate is not None:
            accumulate.view(copies, *x.shape)[0].add_(sparse_ffn_reference(
                x, up, down, idx, gate=gate, bias=bias, down_bias=down_bias, activation=activation, count=count,
                out_dtype=torch.float32))
            return accumulate
        return sparse_ffn_reference(x, up, down, idx, gate=gate, bias=bias, down_bias=down_bias,
                                    activation=activation, count=count)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x: the Triton kernels take float16/bfloat16, got {x.dtype}. Fix: cast, or impl='torch'")
    squeeze = x.dim() == 1
    x2 = (x.reshape(1, -1) if squeeze else x).contiguous()
    if x2.shape[0] == 0:                  # no tokens: nothing to add (a launch would read token 0 of x)
        return accumulate if accumulate is not None else out if out is not None else torch.empty_like(x)
    if accumulate is not None:
        _launch(backend, x2, up, down, idx, gate, bias, down_bias, activation, count, method, config,
                acc_into=accumulate.view(copies, *x2.shape), pdl=pdl)
        return accumulate
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous() \
                or x2.shape[0] > MAX_TOKENS_PER_LAUNCH:
            raise ValueError(f"out: expected a contiguous {x.dtype} tensor of x's shape {tuple(x.shape)} on "
                             f"{x.device} and at most {MAX_TOKENS_PER_LAUNCH} tokens, got {out.dtype} "
                             f"{tuple(out.shape)}. Fix: allocate it like x, or pass out=None")
        _launch(backend, x2, up, down, idx, gate, bias, down_bias, activation, count, method, config,
                out.view(x2.shape), pdl=pdl)
        return out
    outs = [_launch(backend, x2[t0:t0 + MAX_TOKENS_PER_LAUNCH], up, down, idx, gate, bias, down_bias, activation,
                    count, method, config, pdl=pdl) for t0 in range(0, x2.shape[0], MAX_TOKENS_PER_LAUNCH)]
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.reshape(-1) if squeeze else y


def _check_pdl(pdl, x, idx, count, method):
    if pdl not in (False, True, "early"):
        raise ValueError(f"pdl: expected False, True or 'early', got {pdl!r}")
    if pdl and (method != "fused" or x.shape[-1] > MAX_WHOLE_ROW):
        raise ValueError(f"pdl: only method='fused' with d_model <= {MAX_WHOLE_ROW} (got method={method!r}, "
                         f"d_model {x.shape[-1]}). Fix: pass pdl=False")
    if pdl == "early" and x.dim() == 2 and x.shape[0] > 1:
        raise ValueError(f"pdl='early': one token only (its programs compute their first block right after the "
                         f"wait, for token 0), got {x.shape[0]} tokens. Fix: pass pdl=True")
    if pdl == "early" and count is not None:
        raise ValueError("pdl='early': reads the row list and weight rows before the previous kernel has "
                         "finished, so they must not come from a kernel's output, and a device-side count "
                         "(predict_active's) does. Fix: pass count=None (the host's idx) or pdl=True")


def _check_accumulate(x, acc, method, out) -> int:
    """Validate an accumulate= buffer; returns its number of copies of the sum."""
    copies = acc.shape[0] if acc.dim() == x.dim() + 1 else 1
    shape_ok = acc.shape == x.shape or (acc.dim() == x.dim() + 1 and acc.shape[1:] == x.shape
                                        and 1 <= copies <= MAX_N_ACC)
    if acc.dtype != torch.float32 or not shape_ok or acc.device != x.device or not acc.is_contiguous():
        raise ValueError(f"accumulate: expected a contiguous float32 tensor of x's shape {tuple(x.shape)}, or "
                         f"[copies <= {MAX_N_ACC}, *x.shape], on {x.device}; got {acc.dtype} {tuple(acc.shape)} on "
                         f"{acc.device} (contiguous: {acc.is_contiguous()}). Fix: allocate it with "
                         f"torch.zeros(x.shape, dtype=torch.float32, device=x.device)")
    if method not in ("fused", "two_phase") or (method == "fused" and x.shape[-1] > MAX_WHOLE_ROW) \
            or (x.dim() == 2 and x.shape[0] > MAX_TOKENS_PER_LAUNCH):
        raise ValueError(f"accumulate: only method 'fused' (d_model <= {MAX_WHOLE_ROW}) or 'two_phase', with at "
                         f"most {MAX_TOKENS_PER_LAUNCH} tokens (got method={method!r}, x {tuple(x.shape)}). "
                         "Fix: pass accumulate=None and add the returned y yourself")
    if out is not None:
        raise ValueError("out: not with accumulate (the result is the accumulator). Fix: pass one of them")
    return copies


# tuned configs for accumulating launches, by launch shape: tuning runs a kernel many times, which would add
# into the caller's buffer each time, so the tuning launches add into a scratch buffer instead
_ACC_CONFIGS: dict = {}


def _accumulate_config(key, mode: str, tune) -> dict:
    """The accumulating launch's tuned config for this shape (the first call of a shape tunes: make it outside
    CUDA-graph capture; the tuned config is read back as the kernel's last, so not from concurrent threads)."""
    cfg = _ACC_CONFIGS.get(key)
    if cfg is None:
        tune()                               # an accumulating launch of the same shape into a scratch buffer
        cfg = dict(STREAM.best_config(mode + "_acc").all_kwargs(), N_ACC=1)
        _ACC_CONFIGS[key] = cfg
    return cfg


EARLY_CONFIG_MAX_SHARE = 16   # rows per program up to which early_config was measured to beat the tuned pick
EARLY_ALL_ROWS_MAX_SHARE = 8  # the same without an index: only where the two early blocks hold the whole share
EARLY_TAIL_MAX = 1.25   # 4-row blocks beyond 8 rows a program while the longest share is <= this x the mean


def early_config(n_rows: int, sms: int, d_model: int, gated: bool) -> dict:
    """Block sizes for pdl='early' launches with an index, fixed: the autotuner times one launch alone, with
    nothing before it to overlap, so it cannot rank them. A program requests its first two blocks before the
    wait. Where its share of rows fits those (<= 8 rows), 4-row blocks take it all. Beyond, shares are whole
    blocks, so 4-row blocks can leave some programs a whole block more than the rest: 4-row blocks while the
    longest share is at most EARLY_TAIL_MAX x the mean, else 2-row blocks with 16 warps (gated rows, 1.5x as
    wide: 1-row). Measured on the H200 (2026-12-03, 12-16 configs each at OPT-6.7B's and Llama-2-7B's shapes):
    fitted to 13 cases at 86-99% (benchmarks/probes/results/early_config_sweep_fit{1,2}.txt; the fastest config in 11, within
    5% in the others); at 10 sparsities it was not fitted to, within 1.1% of the fastest in 7 and 4.5% at most
    (benchmarks/probes/results/early_config_sweep.txt). `early_pick` says where it applies: beyond EARLY_CONFIG_MAX_SHARE rows
    per program, and without an index beyond EARLY_ALL_ROWS_MAX_SHARE, the tuned configs were as fast or faster
    (OPT 0%: 62.2 vs 77.9 us; all rows at 90%: 9.9-10.5 vs 11.6 us)."""
    share = -(-n_rows // sms)
    block_d = next_pow2(d_model)
    k = 3 if gated else 2
    blocks_4 = -(-n_rows // 4)
    longest_4 = -(-blocks_4 // sms) * 4            # rows of the longest share with 4-row blocks
    fits_4 = _tiles_fit(k, 4, block_d, 16)
    if fits_4 and (share <= 8 or longest_4 * sms <= EARLY_TAIL_MAX * n_rows):
        block_r = 4
    elif fits_4 and gated:
        block_r = 1                  # measured at d_model 4096; wider gated rows keep the rule before it
    else:
        block_r = 2 if _tiles_fit(k, 2, block_d, 16) else 1
    warps = 8 if block_r == 4 and _tiles_fit(k, 4, block_d, 8) else 16
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "N_ACC": 1, "PROGS_PER_SM": 1, "num_warps": warps,
            "num_stages": 1}


def early_pick(n_rows: int, sms: int, d_model: int, gated: bool, indexed: bool) -> dict | None:
    """early_config where it was measured to beat the tuned pick, else None (tune). With an index: up to
    EARLY_CONFIG_MAX_SHARE rows a program. Without one (all resident rows): only while a share fits the two
    blocks requested before the wait (EARLY_ALL_ROWS_MAX_SHARE rows). There the tuner, timing one launch alone,
    picked 6.3 us at OPT-6.7B 95% in one process and 8.0 in another, where 4-row blocks took 6.3-6.4 in both
    (H200, kernel_floor_h200_1202_1511.txt, kernel_floor_h200_1203_1129.txt, in git history at cd7dc41); at 90% (13 rows a
    program) the fixed configs did no better than the tuner, and plain pdl=True beat every early config."""
    bound = EARLY_CONFIG_MAX_SHARE if indexed else EARLY_ALL_ROWS_MAX_SHARE
    return early_config(n_rows, sms, d_model, gated) if n_rows <= bound * sms else None


def _launch(backend, x, up, down, idx, gate, bias, down_bias, activation, count, method, config, y=None,
            acc_into=None, tune_acc=False, pdl=False):
    """acc_into: None (finish into y) or the fp32 sum to add into, [T, D] or [copies, T, D]."""
    T, D = x.shape
    copies = acc_into.shape[0] if acc_into is not None and acc_into.dim() == 3 else 1
    n_rows = up.shape[0]
    n_cap = n_rows if idx is None else idx.numel()
    if D > MAX_WHOLE_ROW and T > 1 and method in ("fused", "per_block"):
        # rows do not fit a register tile: one launch per token (T x the bytes)
        parts = [_launch(backend, x[t:t + 1], up, down, idx, gate, bias, down_bias, activation, count, method,
                         config, None if y is None else y[t:t + 1]) for t in range(T)]
        return torch.cat(parts) if y is None else y
    if T > 1 and acc_into is None and (method == "two_phase" or (method == "fused" and D <= MAX_WHOLE_ROW)):
        # several tokens: the programs add into the (zeroed) workspace, then a second launch of T x D/1024
        # programs drains it into y and re-zeroes it. The in-kernel finish (the last program alone reads T x D
        # sums from L2) took ~17 us of 61 at 8 tokens, OPT-6.7B 90% (H200, kernels_h200_run6.log, in git history at cd7dc41)
        ws, _ = _workspace(x.device, T * D)
        sums = ws[:T * D].view(T, D)
        if config is not None and method == "fused":
            config = dict(config, N_ACC=1)       # one copy: the drain reads one sum (N_ACC is for one token)
        _launch(backend, x, up, down, idx, gate, bias, down_bias, activation, count, method, config,
                acc_into=sums, pdl=pdl)
        y = torch.empty_like(x) if y is None else y
        # launched plainly (no PDL) even when pdl is set: stream order puts it after the accumulating launch
        _drain_kernel[(T, triton.cdiv(D, DRAIN_BLOCK))](sums, y, y.stride(0), D, BLOCK=DRAIN_BLOCK)
        return y
    if pdl == "early" and config is None and backend == "triton":
        config = early_pick(n_cap, _sm_count(x.device), D, gate is not None, idx is not None)
    if acc_into is not None and method == "fused":
        if config is None and backend == "triton" and not tune_acc:
            key = (str(x.device), D, T, next_pow2(n_cap), idx is None,
                   count is None, gate is None, bias is None, down_bias is None, activation, x.dtype)
            # tuned on one copy (the block sizes are about streaming rows); launched on the caller's copies
            config = dict(_accumulate_config(key, "one" if T == 1 else "multi", lambda: _launch(
                backend, x, up, down, idx, gate, bias, down_bias, activation, count, method, None,
                acc_into=torch.zeros((T, D), dtype=torch.float32, device=x.device), tune_acc=True)),
                          N_ACC=copies)
        elif config is not None:
            if int(config.get("N_ACC", copies)) not in (1, copies):
                raise ValueError(f"config: N_ACC={config['N_ACC']} with an accumulate buffer of {copies} copies (the "
                                 f"programs add straight into the caller's copies). Fix: drop N_ACC")
            config = dict(config, N_ACC=copies)
    if y is None:
        y = torch.empty_like(x) if acc_into is None else acc_into
    if config is not None and not 1 <= int(config.get("N_ACC", 1)) <= MAX_N_ACC:
        raise ValueError(f"config: N_ACC must be in 1..{MAX_N_ACC} (the accumulator workspace holds that many "
                         f"copies), got {config['N_ACC']}")
    acc, sem = _workspace(x.device, MAX_N_ACC * T * D) if acc_into is None else (acc_into, x)
    if method == "fused" and D <= MAX_WHOLE_ROW:
        kernel, mode = STREAM, ("one" if T == 1 else "multi")
    elif method in ("fused", "per_block"):
        kernel, mode = FUSED, ("one" if T == 1 else "multi")
    elif method == "fused_tc":
        kernel, mode = FUSED, ("one" if T == 1 else "dot")
    else:
        kernel, mode = None, ("one" if T == 1 else "dot")
    block_t = next_pow2(T) if mode == "multi" else (1 if T == 1 else 16)
    if tune_acc and kernel is STREAM:
        mode += "_acc"
    if config is None and backend == "interpret" and kernel is not None:
        config = dict(kernel.default[mode])
        if kernel is STREAM or config["WHOLE_ROW"]:
            config["BLOCK_D"] = max(config["BLOCK_D"], next_pow2(D))
        if acc_into is not None:
            config["N_ACC"] = copies
    whole = kernel is STREAM or (kernel is FUSED and (config or {}).get("WHOLE_ROW"))
    if config is not None and whole and config["BLOCK_D"] < D:
        raise ValueError(f"config: the whole-row kernels (method 'fused', or WHOLE_ROW=True) need BLOCK_D >= "
                         f"d_model={D}, got {config['BLOCK_D']}")
    g = up if gate is None else gate
    dummy = x
    flags = dict(HAS_IDX=idx is not None, COUNT_ON_DEVICE=count is not None, BLOCK_T=block_t)
    common = (idx if idx is not None and n_cap > 0 else dummy, count if count is not None else dummy, n_cap)
    n_bucket = next_pow2(n_cap)
    act = ACTIVATIONS[activation]
    block_e = min(next_pow2(D), 4096)
    if kernel is not None:
        if kernel is STREAM:
            sms = _sm_count(x.device)
            grid = lambda meta: (max(1, min(triton.cdiv(n_cap, meta["BLOCK_R"]),  # noqa: E731
                                            sms * meta["PROGS_PER_SM"])),)
        else:
            grid = lambda meta: (max(1, triton.cdiv(n_cap, meta["BLOCK_R"])),)  # noqa: E731
        kernel.launch(backend, mode, grid, x, x.stride(0), up, up.stride(0), up.stride(1), g, g.stride(0),
                      g.stride(1), down, down.stride(0), down.stride(1),
                      bias if bias is not None else dummy, down_bias if down_bias is not None else dummy,
                      *common, acc, sem, y, y.stride(0), T, D, n_bucket,
                      HAS_BIAS=bias is not None, HAS_OUT_BIAS=down_bias is not None, GATED=gate is not None,
                      ACT=act, BLOCK_E=block_e, FENCE=backend == "triton", config=config,
                      **({"FINISH": False} if acc_into is not None else {}),
                      **pdl_args(2 if pdl == "early" else int(bool(pdl)), backend), **flags)
        return y
    h = torch.empty((T, max(n_cap, 1)), dtype=torch.float32, device=x.device)
    grid1 = lambda meta: (max(1, triton.cdiv(n_cap, meta["BLOCK_R"])),)  # noqa: E731
    HIDDEN.launch(backend, mode, grid1, x, x.stride(0), up, up.stride(0), up.stride(1), g, g.stride(0),
                  g.stride(1), bias if bias is not None else dummy, *common, h, T, D, n_bucket,
                  HAS_BIAS=bias is not None, GATED=gate is not None, ACT=act, config=config, **flags)
    sms = _sm_count(x.device)

    def grid2(meta):
        col_blocks = triton.cdiv(D, meta["BLOCK_D"])
        split = max(1, min(triton.cdiv(n_cap, meta["BLOCK_R"]), triton.cdiv(2 * sms, col_blocks)))
        return (col_blocks, split)

    DOWN.launch(backend, mode, grid2, h, down, down.stride(0), down.stride(1),
                down_bias if down_bias is not None else dummy, *common, acc, sem, y, y.stride(0), T, D, n_bucket,
                HAS_OUT_BIAS=down_bias is not None, BLOCK_E=block_e, FENCE=backend == "triton", config=config,
                TF32=mode == "dot" and _down_product() == "tf32",
                **({"FINISH": False} if acc_into is not None else {}), **flags)
    return y


def _down_product() -> str:
    if DOWN_PRODUCT not in DOWN_PRODUCTS:
        raise ValueError(f"DOWN_PRODUCT: unknown {DOWN_PRODUCT!r}. Fix: set real.kernels.sparse_ffn's DOWN_PRODUCT "
                         f"(the module, importlib.import_module('real.kernels.sparse_ffn')) to one of {DOWN_PRODUCTS}")
    return DOWN_PRODUCT


def split_bundles(cache: torch.Tensor, d_model: int, gated: bool = False):
    """(gate, up, down) row views of a bundled cache matrix; gate is None unless gated.

    Layout per row (one neuron): [up | down] (2*d_model wide) or, gated, [gate | up | down] (3*d_model).
    """
    width = (3 if gated else 2) * d_model
    if cache.dim() != 2 or cache.shape[1] != width:
        raise ValueError(f"cache: expected [n_rows, {width}] ({'gate|up|down' if gated else 'up|down'} bundles "
                         f"of d_model={d_model}), got {tuple(cache.shape)}. Fix: check d_model and gated")
    parts = [cache[:, i * d_model:(i + 1) * d_model] for i in range(width // d_model)]
    return (parts[0], parts[1], parts[2]) if gated else (None, parts[0], parts[1])


def bundled_sparse_ffn(x, cache, idx=None, *, gated=False, **kwargs):
    """`sparse_ffn` over a bundled cache matrix [n_rows, 2*d_model] (or [n_rows, 3*d_model] when gated)."""
    gate, up, down = split_bundles(cache, x.shape[-1], gated)
    return sparse_ffn(x, up, down, idx, gate=gate, **kwargs)
