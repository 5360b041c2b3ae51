"""Low-rank activation predictor: which FFN neurons will fire, as an index list that never leaves the device.

mask = (x A) B [+ bias] > threshold with A [d_model, r], B [r, d_ff], bias [d_ff] (a trained predictor's
offset); a neuron counts as active when any token of the batch predicts it. No host round trip.

Default: ONE launch, `_predict_kernel`. Its first programs compute z = x A [tokens, r] in fp32 (split over r and,
with `split_k`, d_model; each slice's partial z written to its own plane, no atomics) and each then raises a
ready counter; the other programs first request their B block (the 4 MB that dominate the bytes), THEN wait
for the counter, so reading B overlaps computing z, and add the partial z's, score their BLOCK_N neurons
(z B_blk), compact the ones over the threshold with a prefix sum inside the block, reserve room in the index
list with one atomic on the count and write their numbers; the last of them resets the counters for the next
launch. The scoring programs come after the z programs in launch order and the z programs wait on nothing, so
the wait always ends; it is also bounded (a stale counter gives a wrong list, never a hang). On the H200 the two
launches it replaces (`fused=False`: `_lowrank_kernel` then `_select_kernel`, the same two parts) took 8.0 us at
rank 128, OPT-6.7B, batch 1: benchmarks/kernels.txt has both.

Result: idx int32 [d_ff] (only idx[:count] is meaningful; the order within it is NOT sorted -- blocks append in
whatever order they finish) and count int32 [1], both on the device; `sparse_ffn(..., idx, count=count)`
consumes them as they are. Only `active_list` (or the torch fallback) reads the count back to the host.
Why not torch.nonzero: it must learn the result size on the host, a synchronisation per layer and token.
"""

from __future__ import annotations

import torch

from real.kernels._launch import Kernel, backend_for, configs, next_pow2, triton


def predict_scores_reference(x, A, B, bias=None):
    """(x A) B [+ bias] in fp32 (float64 for float64 inputs): [tokens, d_ff]."""
    work = torch.promote_types(x.dtype, torch.float32)
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    s = (x2.to(work) @ A.to(work)) @ B.to(work)
    return s if bias is None else s + bias.to(work)


def predict_active_reference(x, A, B, threshold: float = 0.0, bias=None):
    """Same contract as `predict_active`, in plain torch (sorted indices; synchronises on nonzero)."""
    mask = (predict_scores_reference(x, A, B, bias) > threshold).any(dim=0)
    found = torch.nonzero(mask).reshape(-1).to(torch.int32)
    idx = torch.zeros(B.shape[1], dtype=torch.int32, device=x.device)
    idx[: found.numel()] = found
    return idx, torch.tensor([found.numel()], dtype=torch.int32, device=x.device)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lowrank_part(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, T, K, R, K_CHUNK, pid, pid_k,
                      BLOCK_T: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_K: tl.constexpr):
        """z_part[pid_k] = x[:, slice] A[slice, r block pid]: one program's share of x A."""
        offs_r = pid * BLOCK_RR + tl.arange(0, BLOCK_RR)
        rmask = offs_r < R
        offs_k = tl.arange(0, BLOCK_K)
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        acc1 = tl.zeros([BLOCK_K, BLOCK_RR], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_RR], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            kmask = k < k_hi
            a = tl.load(a_ptr + k[:, None] * s_ak + offs_r[None, :] * s_ar, mask=kmask[:, None] & rmask[None, :],
                        other=0.0)
            if BLOCK_T == 1:
                xv = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                acc1 += a.to(tl.float32) * xv[:, None]
            else:
                xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :], mask=tmask[:, None] & kmask[None, :],
                             other=0.0)
                acc = tl.dot(xt, a, acc)
        if BLOCK_T == 1:
            acc = tl.reshape(tl.sum(acc1, axis=0), [1, BLOCK_RR])
        # this program's share of z over its slice of d_model: z_part[pid_k]; the scoring part adds them
        z_part = z_ptr + pid_k * T * R
        tl.store(z_part + offs_t[:, None] * R + offs_r[None, :], acc, mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _load_b_block(b_ptr, s_br, s_bn, pid, R, N, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        return tl.load(b_ptr + offs_r[:, None] * s_br + offs_n[None, :] * s_bn,
                       mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0.0)

    @triton.jit
    def _select_part(z_ptr, b, bias_ptr, idx_ptr, count_ptr, threshold, T, R, N, pid,
                     BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        """Score BLOCK_N neurons with the B block `b` and append the active ones to idx. z is read through L2
        (.cg): other programs of the same launch may have written it."""
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_r = tl.arange(0, R_PAD)
        rmask = offs_r < R
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        if BLOCK_T == 1:
            z = tl.load(z_ptr + offs_r, mask=rmask, other=0.0, cache_modifier=".cg")
            for part in range(1, SPLIT_K):                 # the low-rank part's d_model slices
                z += tl.load(z_ptr + part * R + offs_r, mask=rmask, other=0.0, cache_modifier=".cg")
            s = tl.reshape(tl.sum(b.to(tl.float32) * z[:, None], axis=0), [1, BLOCK_N])
        else:
            zoffs = offs_t[:, None] * R + offs_r[None, :]
            zmask = tmask[:, None] & rmask[None, :]
            z = tl.load(z_ptr + zoffs, mask=zmask, other=0.0, cache_modifier=".cg")
            for part in range(1, SPLIT_K):
                z += tl.load(z_ptr + part * T * R + zoffs, mask=zmask, other=0.0, cache_modifier=".cg")
            s = tl.dot(z.to(b.dtype), b)
        if HAS_BIAS:                                       # a trained predictor's per-neuron offset
            s = s + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        hit = (s > threshold) & tmask[:, None]
        active = (tl.max(hit.to(tl.int32), axis=0) > 0) & nmask
        flag = active.to(tl.int32)
        base = tl.atomic_add(count_ptr, tl.sum(flag, axis=0), sem="relaxed")
        pos = base + tl.cumsum(flag, axis=0) - flag
        tl.store(idx_ptr + pos, offs_n, mask=active & (pos < N))

    @triton.jit
    def _lowrank_kernel(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, count_ptr, T, K, R, K_CHUNK,
                        BLOCK_T: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        if (pid == 0) & (pid_k == 0):
            tl.store(count_ptr, 0)
        _lowrank_part(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, T, K, R, K_CHUNK, pid, pid_k, BLOCK_T, BLOCK_RR,
                      BLOCK_K)

    @triton.jit
    def _select_kernel(z_ptr, b_ptr, s_br, s_bn, bias_ptr, idx_ptr, count_ptr, threshold, T, R, N,
                       BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
        pid = tl.program_id(0)
        b = _load_b_block(b_ptr, s_br, s_bn, pid, R, N, R_PAD, BLOCK_N)
        _select_part(z_ptr, b, bias_ptr, idx_ptr, count_ptr, threshold, T, R, N, pid, BLOCK_T, R_PAD, BLOCK_N,
                     SPLIT_K, HAS_BIAS)

    @triton.jit
    def _fence(anchor, FENCE: tl.constexpr):
        """fence.acq_rel.gpu in every thread (compiled kernels; the interpreter runs programs one by one)."""
        if FENCE:
            tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [anchor], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _nap(anchor, FENCE: tl.constexpr):
        """nanosleep of ~0.1 us between polls (compiled kernels only)."""
        if FENCE:
            tl.inline_asm_elementwise("nanosleep.u32 100; mov.u32 $0, $1;", "=r,r", [anchor], dtype=tl.int32,
                                      is_pure=False, pack=1)

    MAX_SPINS = 1 << 22   # ~ 0.5 s of polling: a wait that long means a stale counter, not a slow x A

    @triton.jit
    def _predict_kernel(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, b_ptr, s_br, s_bn, bias_ptr, idx_ptr,
                        count_ptr, sync_ptr, threshold, T, K, R, N, K_CHUNK,
                        BLOCK_T: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, FENCE: tl.constexpr,
                        SPINS: tl.constexpr):
        """One launch: the first cdiv(R, BLOCK_RR) * SPLIT_K programs compute x A, the rest score neurons (module
        doc). sync_ptr[0]: x A programs done; sync_ptr[1]: scoring programs done (the last one zeroes both)."""
        pid = tl.program_id(0)
        N_LOWRANK = tl.cdiv(R, BLOCK_RR) * SPLIT_K
        if pid < N_LOWRANK:
            n_rb = tl.cdiv(R, BLOCK_RR)
            if pid == 0:
                tl.store(count_ptr, 0)
            _lowrank_part(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, T, K, R, K_CHUNK, pid % n_rb, pid // n_rb,
                          BLOCK_T, BLOCK_RR, BLOCK_K)
            _fence(pid, FENCE)            # this thread's z stores (and the count's zero) visible GPU-wide ...
            tl.debug_barrier()            # ... for every thread of the program, before it signals
            tl.atomic_add(sync_ptr, 1, sem="release")
        else:
            sid = pid - N_LOWRANK
            b = _load_b_block(b_ptr, s_br, s_bn, sid, R, N, R_PAD, BLOCK_N)   # in flight while x A finishes
            # poll with plain (volatile) loads and a short sleep: 100+ programs hammering one counter with
            # atomics slowed the x A programs' own signals (one launch took 9.2 us against 7.3 for two, H200)
            spins = 0
            while (tl.load(sync_ptr, volatile=True) < N_LOWRANK) & (spins < SPINS):
                _nap(pid, FENCE)
                spins += 1
            _fence(pid, FENCE)            # acquire: z is read after the counter was seen complete
            tl.debug_barrier()
            _select_part(z_ptr, b, bias_ptr, idx_ptr, count_ptr, threshold, T, R, N, sid, BLOCK_T, R_PAD, BLOCK_N,
                         SPLIT_K, HAS_BIAS)
            _fence(pid, FENCE)
            tl.debug_barrier()
            n_sel = tl.num_programs(0) - N_LOWRANK
            if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == n_sel - 1:   # the last one: reset for next launch
                tl.atomic_xchg(sync_ptr, 0)
                tl.atomic_xchg(sync_ptr + 1, 0)

    LOWRANK = Kernel(_lowrank_kernel,
                     {m: configs([(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                                  (32, 256, 8, 3)], ("BLOCK_RR", "BLOCK_K")) for m in ("one", "dot")},
                     {"one": {"BLOCK_RR": 8, "BLOCK_K": 64}, "dot": {"BLOCK_RR": 16, "BLOCK_K": 32}},
                     key=["K", "R", "BLOCK_T", "SPLIT_K"])
    SELECT = Kernel(_select_kernel,
                    {m: configs([(32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)], ("BLOCK_N",))
                     for m in ("one", "dot")},
                    {"one": {"BLOCK_N": 64}, "dot": {"BLOCK_N": 32}},
                    key=["R", "N", "BLOCK_T", "SPLIT_K", "HAS_BIAS"], reset_to_zero=["count_ptr"])
    # one launch: (BLOCK_RR, BLOCK_K, BLOCK_N, num_warps, num_stages); x A's and the scoring programs share warps
    PREDICT = Kernel(_predict_kernel,
                     {m: configs([(8, 512, 128, 4, 1), (8, 1024, 128, 8, 1), (16, 512, 128, 4, 1), (8, 512, 64, 4, 1),
                                  (16, 256, 256, 8, 1), (4, 1024, 128, 4, 1), (8, 512, 256, 8, 1)],
                                 ("BLOCK_RR", "BLOCK_K", "BLOCK_N")) for m in ("one", "dot")},
                     {"one": {"BLOCK_RR": 8, "BLOCK_K": 64, "BLOCK_N": 64},
                      "dot": {"BLOCK_RR": 16, "BLOCK_K": 32, "BLOCK_N": 32}},
                     key=["K", "R", "N", "BLOCK_T", "SPLIT_K", "HAS_BIAS"])


_SYNC: dict = {}


def _sync_counters(device: torch.device):
    """Two int32 counters per (device, stream), zero between launches (each launch resets them at its end);
    concurrent streams get their own, as launches on one stream run in order."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _SYNC[key]


def _check(x, A, B, bias=None):
    if x.dim() not in (1, 2):
        raise ValueError(f"x: expected [d_model] or [tokens, d_model], got shape {tuple(x.shape)}")
    d_model = x.shape[-1]
    if A.dim() != 2 or A.shape[0] != d_model:
        raise ValueError(f"A: expected [d_model={d_model}, rank], got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[0] != A.shape[1]:
        raise ValueError(f"B: expected [rank={A.shape[1]}, d_ff], got {tuple(B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != B.shape[1]):
        raise ValueError(f"bias: expected [d_ff={B.shape[1]}], got {tuple(bias.shape)}")
    for name, m in (("A", A), ("B", B)) + ((("bias", bias),) if bias is not None else ()):
        if m.dtype != x.dtype or m.device != x.device:
            raise ValueError(f"{name}: dtype/device {m.dtype}/{m.device} differs from x's {x.dtype}/{x.device}. "
                             "Fix: cast the predictor to the activations' dtype and device")


def predict_active(x, A, B, threshold: float = 0.0, *, bias=None, impl="auto", config=None,
                   split_k: int | None = None, fused: bool = True):
    """Active neurons predicted for x: (idx int32 [d_ff], count int32 [1]) on x's device, no host sync.

    x: [d_model] or [tokens <= 16, d_model]; A [d_model, r]; B [r, d_ff]; bias [d_ff] or None; a neuron
    is active when ((x A) B + bias)[t, n] > threshold for any token t. Only idx[:count] is meaningful, in no particular order.
    config: fixed block sizes instead of autotuning (tests): {'BLOCK_RR', 'BLOCK_K', 'BLOCK_N'} for the one
    launch, {'lowrank': {...}, 'select': {...}} with fused=False.
    fused: one launch (default) or two (x A, then scoring): module doc.
    split_k: slices of d_model for x A (more programs streaming A); None (default) = auto (slices of ~512,
    at most 16); 1 = no split. On the H100 (OPT-6.7B, rank 128) auto took 9.7 us against 10.4 us for 1
    at batch 1 and 10.1 against 15.5 us at batch 8 (benchmarks/kernels.txt).
    """
    _check(x, A, B, bias)
    backend = backend_for(x, impl)
    if backend == "torch":
        return predict_active_reference(x, A, B, threshold, bias)
    x2 = (x.reshape(1, -1) if x.dim() == 1 else x).contiguous()
    T, K = x2.shape
    R, N = B.shape
    if T > 16:
        raise ValueError(f"x: at most 16 tokens per call, got {T}. Fix: split the batch")
    block_t = 1 if T == 1 else 16
    mode = "one" if T == 1 else "dot"
    # x A over d_model slices: a rank-128 x A has only R / BLOCK_RR column blocks, likely too few programs to
    # stream A at full bandwidth; the select kernel adds the slices' partial z
    if split_k is None:
        split_k = max(1, min(16, K // 512))
    if not (isinstance(split_k, int) and 1 <= split_k <= 64):
        raise ValueError(f"split_k: expected None or an integer in 1..64, got {split_k!r}")
    k_chunk = triton.cdiv(K, split_k)
    z = torch.empty((split_k, T, R), dtype=torch.float32, device=x.device)
    idx = torch.empty(N, dtype=torch.int32, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    config = config or {}
    if fused and ("lowrank" in config or "select" in config):
        raise ValueError("config: {'lowrank', 'select'} configure the two-launch form. Fix: pass fused=False, or "
                         "give the one launch's {'BLOCK_RR', 'BLOCK_K', 'BLOCK_N'}")
    r_pad = max(16, next_pow2(R))
    bias_arg = B if bias is None else bias.contiguous()
    if fused:
        n_lowrank = lambda meta: triton.cdiv(R, meta["BLOCK_RR"]) * split_k  # noqa: E731
        PREDICT.launch(backend, mode, lambda meta: (n_lowrank(meta) + triton.cdiv(N, meta["BLOCK_N"]),), x2,
                       x2.stride(0), A, A.stride(0), A.stride(1), z, B, B.stride(0), B.stride(1), bias_arg, idx,
                       count, _sync_counters(x.device), float(threshold), T, K, R, N, k_chunk, BLOCK_T=block_t, R_PAD=r_pad, SPLIT_K=split_k, HAS_BIAS=bias is not None,
                       FENCE=backend == "triton", SPINS=MAX_SPINS, config=config or None)
        return idx, count
    LOWRANK.launch(backend, mode, lambda meta: (triton.cdiv(R, meta["BLOCK_RR"]), split_k), x2, x2.stride(0), A,
                   A.stride(0), A.stride(1), z, count, T, K, R, k_chunk, BLOCK_T=block_t, SPLIT_K=split_k,
                   config=config.get("lowrank"))
    SELECT.launch(backend, mode, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), z, B, B.stride(0), B.stride(1),
                  bias_arg, idx, count, float(threshold), T, R, N, BLOCK_T=block_t,
                  R_PAD=r_pad, SPLIT_K=split_k, HAS_BIAS=bias is not None,
                  config=config.get("select"))
    return idx, count


def active_list(idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """idx[:count], sorted: for inspection and tests (reads count on the host: a synchronisation)."""
    return torch.sort(idx[: int(count.reshape(-1)[0])].long()).values
