"""Low-rank activation predictor: which FFN neurons will fire, as an index list that never leaves the device.

mask = (x A) B [+ bias] > threshold with A [d_model, r], B [r, d_ff], bias [d_ff] (a trained predictor's
offset); a neuron counts as active when any token of the batch predicts it. Two Triton kernels, no host round trip:

1. `_lowrank_kernel`: z = x A [tokens, r] in fp32; programs split r (and, with `split_k`, d_model),
   each slice's partial z written once to its own plane, so no zeroing or atomics are needed; program
   (0, 0) also zeroes the active counter.
2. `_select_kernel`: each program adds the slices' partial z, scores BLOCK_N neurons (z B_blk), compacts the ones over the threshold
   with a prefix sum inside the block, reserves room in the index list with one atomic on the counter, and
   writes their numbers.

Result: idx int32 [d_ff] (only idx[:count] is meaningful; the order within it is NOT sorted -- blocks append in
whatever order they finish) and count int32 [1], both on the device; `sparse_ffn(..., idx, count=count)`
consumes them as they are. Only `active_list` (or the torch fallback) reads the count back to the host.
Why not torch.nonzero: it must learn the result size on the host, a synchronisation per layer and token.
"""

from __future__ import annotations

import torch

from real.kernels._launch import Kernel, backend_for, configs, next_pow2, pdl_args, triton


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


def misclassified(x, A, B, idx, count, threshold: float = 0.0) -> tuple[int, int]:
    """A one-token predicted set (idx[:count]) against float64 scores of the same x, A, B: (neurons on the
    other side of the threshold, those of them beyond the kernels' rounding). The fp16/bf16 inputs are exact
    in float64 and the one-token kernels add their products in fp32, so a score may be off by at most
    (d_model + rank) fp32 roundings of (|x| |A|) |B|. For tests and benchmarks (reads count on the host)."""
    x64, a, b = x.reshape(1, -1).double(), A.double(), B.double()
    score = ((x64 @ a) @ b)[0]
    bound = (A.shape[0] + A.shape[1]) * torch.finfo(torch.float32).eps * ((x64.abs() @ a.abs()) @ b.abs())[0]
    got = torch.zeros(B.shape[1], dtype=torch.bool, device=x.device)
    got[idx[: int(count.reshape(-1)[0])].long()] = True
    off = got != (score > threshold)
    return int(off.sum()), int((off & ((score - threshold).abs() > bound)).sum())


if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _a_tile(a_ptr, s_ak, s_ar, k0, offs_k, k_hi, offs_r, rmask):
        """A's [BLOCK_K, BLOCK_RR] tile at rows k0.. (masked to this slice's end k_hi), with those row numbers."""
        k = k0 + offs_k
        kmask = k < k_hi
        a = tl.load(a_ptr + k[:, None] * s_ak + offs_r[None, :] * s_ar, mask=kmask[:, None] & rmask[None, :],
                    other=0.0)
        return a, k, kmask

    @triton.jit
    def _lowrank_step(x_ptr, stride_xt, a, k, kmask, offs_t, tmask, acc1, acc, BLOCK_T: tl.constexpr):
        """Add one [BLOCK_K, BLOCK_RR] tile of A times x's matching slice into the fp32 accumulators."""
        if BLOCK_T == 1:
            xv = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            acc1 += a.to(tl.float32) * xv[:, None]
        else:
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :], mask=tmask[:, None] & kmask[None, :],
                         other=0.0)
            acc = tl.dot(xt, a, acc)
        return acc1, acc

    @triton.jit
    def _lowrank_kernel(x_ptr, stride_xt, a_ptr, s_ak, s_ar, z_ptr, count_ptr, T, K, R, K_CHUNK,
                        BLOCK_T: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, PDL: tl.constexpr = False):
        """PDL: let the next kernel launch at once, request the first tile of A (a weight no kernel writes),
        then wait for the previous kernel before reading x or writing z and the counter."""
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_r = pid * BLOCK_RR + tl.arange(0, BLOCK_RR)
        rmask = offs_r < R
        offs_k = tl.arange(0, BLOCK_K)
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        acc1 = tl.zeros([BLOCK_K, BLOCK_RR], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_RR], tl.float32)
        # the first tile is peeled off the loop so that, with PDL, it is in flight before the wait
        a, k, kmask = _a_tile(a_ptr, s_ak, s_ar, k_lo, offs_k, k_hi, offs_r, rmask)
        if PDL:
            gdc_wait()
        if (pid == 0) & (pid_k == 0):
            tl.store(count_ptr, 0)
        acc1, acc = _lowrank_step(x_ptr, stride_xt, a, k, kmask, offs_t, tmask, acc1, acc, BLOCK_T)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            a, k, kmask = _a_tile(a_ptr, s_ak, s_ar, k0, offs_k, k_hi, offs_r, rmask)
            acc1, acc = _lowrank_step(x_ptr, stride_xt, a, k, kmask, offs_t, tmask, acc1, acc, BLOCK_T)
        if BLOCK_T == 1:
            acc = tl.reshape(tl.sum(acc1, axis=0), [1, BLOCK_RR])
        # this program's share of z over its slice of d_model: z_part[pid_k]; the select kernel adds them
        z_part = z_ptr + pid_k * T * R
        tl.store(z_part + offs_t[:, None] * R + offs_r[None, :], acc, mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def _select_kernel(z_ptr, b_ptr, s_br, s_bn, bias_ptr, idx_ptr, count_ptr, threshold, T, R, N,
                       BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False):
        """PDL: let the next kernel launch, request this block of B and the bias (weights), then wait for the
        low-rank kernel before reading z or touching the counter."""
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_r = tl.arange(0, R_PAD)
        rmask = offs_r < R
        offs_t = tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        b = tl.load(b_ptr + offs_r[:, None] * s_br + offs_n[None, :] * s_bn, mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        bias = 0.0
        if HAS_BIAS:                                       # a trained predictor's per-neuron offset
            bias = tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if PDL:
            gdc_wait()
        if BLOCK_T == 1:
            z = tl.load(z_ptr + offs_r, mask=rmask, other=0.0)
            for part in range(1, SPLIT_K):                 # the low-rank kernel's d_model slices
                z += tl.load(z_ptr + part * R + offs_r, mask=rmask, other=0.0)
            s = tl.reshape(tl.sum(b.to(tl.float32) * z[:, None], axis=0), [1, BLOCK_N])
        else:
            zoffs = offs_t[:, None] * R + offs_r[None, :]
            zmask = tmask[:, None] & rmask[None, :]
            z = tl.load(z_ptr + zoffs, mask=zmask, other=0.0)
            for part in range(1, SPLIT_K):
                z += tl.load(z_ptr + part * T * R + zoffs, mask=zmask, other=0.0)
            s = tl.dot(z.to(b.dtype), b)
        s = s + bias
        hit = (s > threshold) & tmask[:, None]
        active = (tl.max(hit.to(tl.int32), axis=0) > 0) & nmask
        flag = active.to(tl.int32)
        base = tl.atomic_add(count_ptr, tl.sum(flag, axis=0), sem="relaxed")
        pos = base + tl.cumsum(flag, axis=0) - flag
        tl.store(idx_ptr + pos, offs_n, mask=active & (pos < N))

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


# pdl=True launches these fixed configs instead of autotuning: the autotuner times one launch alone (after a
# flush), which cannot see the overlap PDL gives: at batch 8 the pairs within 5% of the best plain time took
# 7.2-11.7 us with PDL. Picked by benchmarks/probes/predictor_configs.py at OPT-6.7B's shapes (rank
# 128; H200, 2026-12-02, two processes within 0.1 us): 5.8 us at batch 1, 7.1-7.2 us at batch 8 (in
# bench_kernels' later processes 5.9-6.0 and 7.5 us: kernels_h200_run11_predictor.log, in git history at cd7dc41).
PDL_CONFIGS_MAX_RANK = 128   # the rank they were measured at; higher ranks need larger tiles of B
PDL_CONFIGS = {
    "one": {"lowrank": {"BLOCK_RR": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
            "select": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
    "dot": {"lowrank": {"BLOCK_RR": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
            "select": {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3}},
}


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
                   split_k: int | None = None, pdl: bool = False):
    """Active neurons predicted for x: (idx int32 [d_ff], count int32 [1]) on x's device, no host sync.

    x: [d_model] or [tokens <= 16, d_model]; A [d_model, r]; B [r, d_ff]; bias [d_ff] or None; a neuron
    is active when ((x A) B + bias)[t, n] > threshold for any token t. Only idx[:count] is meaningful, in no particular order.
    config: {'lowrank': {...}, 'select': {...}} fixed block sizes instead of autotuning (tests).
    split_k: slices of d_model for x A (more programs streaming A); None (default) = auto (slices of ~512,
    at most 16); 1 = no split. On the H100 (OPT-6.7B, rank 128) auto took 9.7 us against 10.4 us for 1
    at batch 1 and 10.1 against 15.5 us at batch 8; on the H200 7.3 against 10.2 and 9.6 against 15.8 us
    (kernels-h100.txt, in git history at cd7dc41; benchmarks/results/kernels.txt).
    pdl: launch both kernels with programmatic dependent launch (CUDA; ignored elsewhere). Each may start
    while the stream's previous kernel finishes: it requests its first tile of A (or its block of B and the
    bias) at once and waits for that kernel before reading x or z, so the weights stream during the previous
    kernel's tail. Safe after any kernel, provided no kernel that may still be running writes A, B or bias.
    Without `config`, PDL launches take PDL_CONFIGS (fixed, measured) rather than the autotuner's pick, up to
    rank PDL_CONFIGS_MAX_RANK. Needs a Hopper-class GPU (compute capability 9.0+).
    """
    _check(x, A, B, bias)
    if pdl not in (False, True):
        raise ValueError(f"pdl: expected False or True, got {pdl!r}")
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
    if config is None and pdl and backend == "triton" and R <= PDL_CONFIGS_MAX_RANK:
        config = PDL_CONFIGS[mode]                # beyond the measured rank the autotuner picks, as without PDL
    config = config or {}
    bias = None if bias is None else bias.contiguous()  # before the launches: a PDL select reads it before its wait
    launch_pdl = pdl_args(int(pdl), backend)
    LOWRANK.launch(backend, mode, lambda meta: (triton.cdiv(R, meta["BLOCK_RR"]), split_k), x2, x2.stride(0), A,
                   A.stride(0), A.stride(1), z, count, T, K, R, k_chunk, BLOCK_T=block_t, SPLIT_K=split_k,
                   config=config.get("lowrank"), **launch_pdl)
    SELECT.launch(backend, mode, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), z, B, B.stride(0), B.stride(1),
                  B if bias is None else bias, idx, count, float(threshold), T, R, N, BLOCK_T=block_t,
                  R_PAD=max(16, next_pow2(R)), SPLIT_K=split_k, HAS_BIAS=bias is not None,
                  config=config.get("select"), **launch_pdl)
    return idx, count


def active_list(idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """idx[:count], sorted: for inspection and tests (reads count on the host: a synchronisation)."""
    return torch.sort(idx[: int(count.reshape(-1)[0])].long()).values
