"""Fused residual add + LayerNorm (OPT) or + RMSNorm (Llama), forward: one pass instead of two kernels.

new_residual = x + residual (rounded to the input dtype, exactly as torch's unfused add stores it), then
normed = norm(new_residual) computed in fp32 from that rounded sum. Returns (normed, new_residual).
One program per token row keeps the whole row (d_model <= 65536) in registers.

x may also be the sparse FFN's fp32 sum (``sparse_ffn(accumulate=acc)``) with ``consume=True``: the kernel
reads it, rounds x + residual to the residual's dtype, and stores zeros back, so the next layer's FFN adds into
a clean buffer. That pair is the FFN's fused form: the FFN launch has no epilogue (no ticket, cast or re-zeroing
of a workspace, ~2.2-2.4 us on the H200: benchmarks/probes/results/kernel_floor.txt), and the reset costs this kernel one 4-byte
store per element of a row it holds anyway. The sum may come in copies ([copies, *residual.shape], the FFN's
programs spread over them, see sparse_ffn's accumulate): the kernel adds them up in order and zeroes each; one
program per row reads and zeroes every copy, ~0.35-0.55 us per extra copy at d_model 4096 (H200). With consume,
an x of one more dim than the residual is always read as copies (x [T, D] with a residual [D]: T copies).

pdl=True launches with programmatic dependent launch (CUDA): the launch may start while the stream's previous
kernel finishes, its programs wait for that kernel before reading anything, and they let the next kernel launch
at once; between PDL launches (e.g. the accumulating FFN with ``pdl=True``) that hides launch latency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from real.kernels._launch import Kernel, backend_for, configs, next_pow2, pdl_args, triton

MAX_COPIES = 8   # copies of an FFN sum a consuming launch adds up (sparse_ffn's accumulate= takes up to 8)


def _in_copies(x, residual) -> bool:
    """x [copies, *residual.shape]: an FFN's sum in copies (valid with consume=True only, see _check)."""
    return x.dim() == residual.dim() + 1 and x.shape[1:] == residual.shape


def _sum_reference(x, residual, consume):
    """x + residual in the residual's dtype (x's copies added up first); x zeroed afterwards when consumed."""
    total = x
    if _in_copies(x, residual):
        total = x[0].clone()
        for c in range(1, x.shape[0]):
            total += x[c]
    new_res = (total + residual).to(residual.dtype)
    if consume:
        x.zero_()
    return new_res


def add_layer_norm_reference(x, residual, weight=None, bias=None, eps: float = 1e-5, consume: bool = False):
    new_res = _sum_reference(x, residual, consume)
    x = new_res
    normed = F.layer_norm(new_res.to(torch.promote_types(x.dtype, torch.float32)), new_res.shape[-1:],
                          None if weight is None else weight.to(torch.promote_types(x.dtype, torch.float32)),
                          None if bias is None else bias.to(torch.promote_types(x.dtype, torch.float32)), eps)
    return normed.to(x.dtype), new_res


def add_rms_norm_reference(x, residual, weight=None, eps: float = 1e-6, consume: bool = False):
    new_res = _sum_reference(x, residual, consume)
    x = new_res
    v = new_res.to(torch.promote_types(x.dtype, torch.float32))
    normed = v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.to(v.dtype)
    return normed.to(x.dtype), new_res


if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, res_ptr, D, eps, s_x, s_r, s_o, s_res, s_copy,
                         RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, CONSUME: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr = False, COPIES: tl.constexpr = 1):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK)
        m = d < D
        x = tl.load(x_ptr + row * s_x + d, mask=m, other=0.0).to(tl.float32)
        for c in tl.static_range(1, COPIES):      # the FFN's copies of its sum (s_copy apart), added in order
            x += tl.load(x_ptr + c * s_copy + row * s_x + d, mask=m, other=0.0)
        r = tl.load(r_ptr + row * s_r + d, mask=m, other=0.0).to(tl.float32)
        if CONSUME:  # x is the FFN's fp32 sum: leave it zeroed for the next accumulating launch
            # every warp has read x before any zeroes it: the compiler gives the read its consumer's thread
            # layout (8 per thread) and the zero store another (4), so without the barrier a warp could zero
            # elements another had not read yet (seen on the H200 with 2 copies and 16 warps: ~2e-2 error)
            tl.debug_barrier()
            for c in tl.static_range(COPIES):
                tl.store(x_ptr + c * s_copy + row * s_x + d, tl.zeros([BLOCK], tl.float32), mask=m)
        s = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * s_res + d, s, mask=m)
        v = s.to(tl.float32)
        if RMS:
            y = v * tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
        else:
            c = tl.where(m, v - tl.sum(v, axis=0) / D, 0.0)
            y = c * tl.rsqrt(tl.sum(c * c, axis=0) / D + eps)
        if HAS_W:
            y = y * tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + d, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * s_o + d, y.to(out_ptr.dtype.element_ty), mask=m)

    # restore_value: with CONSUME a launch zeroes x, so every tuning run must see the caller's x again (a
    # first consuming call once returned norm(residual) alone: docs/kernels_notes.md, 2026-12-02)
    ADD_NORM = Kernel(_add_norm_kernel, {"row": configs([(4, 1), (8, 1), (16, 1)], ())}, {"row": {}},
                      key=["D", "RMS", "CONSUME", "COPIES"], restore_value=["x_ptr"])


def _check(x, residual, weight, bias, consume, pdl=False):
    if pdl not in (False, True):
        raise ValueError(f"pdl: expected False or True, got {pdl!r} ('early' is the sparse FFN's alone)")
    # copies of an FFN's sum only with consume: an extra leading dim otherwise is likelier a broadcasting mistake
    copies = _in_copies(x, residual)
    if copies and not (consume and 1 <= x.shape[0] <= MAX_COPIES):
        raise ValueError(f"x: shape {tuple(x.shape)} reads as {x.shape[0]} copies of an FFN sum over residual "
                         f"{tuple(residual.shape)}, which needs consume=True and 1..{MAX_COPIES} copies. Fix: pass "
                         f"consume=True with [copies <= {MAX_COPIES}, *residual.shape], or x of residual's shape")
    if not (x.shape == residual.shape or copies) or x.device != residual.device \
            or x.dtype not in (residual.dtype, torch.float32):
        raise ValueError(f"residual: shape/dtype/device {tuple(residual.shape)}/{residual.dtype}/{residual.device} "
                         f"must equal x's {tuple(x.shape)}/{x.dtype}/{x.device} (x may be float32: an FFN's sum, "
                         f"with consume=True also as its copies [copies, *residual.shape]). Fix: pass tensors of "
                         f"one shape, device and dtype (or x float32)")
    if consume and (x.dtype != torch.float32 or not x.is_contiguous()):
        raise ValueError(f"consume: x must be a contiguous float32 sum (sparse_ffn's accumulate buffer), got "
                         f"{x.dtype} (contiguous: {x.is_contiguous()}). Fix: pass consume=False")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"{name}: expected [{x.shape[-1]}], got {tuple(p.shape)}")
    if x.shape[-1] > 65536:
        raise ValueError(f"x: d_model={x.shape[-1]} exceeds the one-row-per-program limit of 65536")


def _fused(backend, x, residual, weight, bias, eps, rms, consume, pdl):
    D = x.shape[-1]
    copies = x.shape[0] if _in_copies(x, residual) else 1     # consume: x is contiguous (checked)
    x2, r2 = x.reshape(-1, D), residual.reshape(-1, D)   # a view when consume (x is contiguous)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out, new_res = torch.empty_like(r2), torch.empty_like(r2)
    if r2.shape[0] > 0:
        ADD_NORM.launch(backend, "row", (r2.shape[0],), x2, r2, weight if weight is not None else x2,
                        bias if bias is not None else x2, out, new_res, D, float(eps), x2.stride(0), r2.stride(0),
                        out.stride(0), new_res.stride(0), r2.shape[0] * D, RMS=rms, HAS_W=weight is not None,
                        HAS_B=bias is not None, CONSUME=consume, BLOCK=next_pow2(D), COPIES=copies,
                        **pdl_args(int(pdl), backend))
    return out.reshape(residual.shape), new_res.reshape(residual.shape)


def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5, *, consume: bool = False,
                   impl="auto", pdl: bool = False):
    """(layer_norm(x + residual), x + residual) over the last dim; x, residual [..., d_model] of one dtype,
    or x the fp32 sum of an accumulating sparse FFN (results in the residual's dtype); consume=True zeroes
    that sum after reading it, and takes it also as copies [copies, *residual.shape] (added up, all zeroed);
    pdl: programmatic dependent launch (module doc; CUDA only, else ignored)."""
    _check(x, residual, weight, bias, consume, pdl)
    backend = backend_for(residual, impl)
    if backend == "torch":
        return add_layer_norm_reference(x, residual, weight, bias, eps, consume)
    return _fused(backend, x, residual, weight, bias, eps, rms=False, consume=consume, pdl=pdl)


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6, *, consume: bool = False, impl="auto",
                 pdl: bool = False):
    """(rms_norm(x + residual) * weight, x + residual) over the last dim (Llama's RMSNorm, forward); x,
    consume and pdl as in `add_layer_norm`."""
    _check(x, residual, weight, None, consume, pdl)
    backend = backend_for(residual, impl)
    if backend == "torch":
        return add_rms_norm_reference(x, residual, weight, eps, consume)
    return _fused(backend, x, residual, weight, None, eps, rms=True, consume=consume, pdl=pdl)
