"""Compile the sparse FFN, predictor and add+norm kernels for Hopper (sm_90) on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which skips what only the compiler sees: inline
assembly (griddepcontrol for PDL, fences), static asserts, tf32 dots, register-heavy whole-row tiles. Triton
can compile for a CUDA target without a device (its wheel brings ptxas), so this builds each specialization
the library launches, down to a cubin, and checks the PTX of the PDL variants: a launch that waits first
(PDL 1: the sparse FFN's `pdl=True`, the norms) issues no global load before `griddepcontrol.wait`; one that
requests its weights early (PDL 2: `pdl="early"`, the predictor's `pdl=True`) issues loads before it. Each
is specialized as a launch from torch would be (`compile_one`), and its registers and stack are read from the
cubin: more than MAX_SPILL_BYTES of stack per thread (a spilled tile) fails, and so does a store of fp32 zeros
after an fp32 read in another thread layout with no barrier between (`check_zeroing`).

    python scripts/compile_kernels_sm90.py        # prints one line per specialization; exit 1 on a failure

Run by tests/test_kernels_compile.py in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled. Fix: unset it")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
NO_TOOLCHAIN = 3          # exit status when this triton cannot compile for CUDA here (the test then skips)
sparse = importlib.import_module("real.kernels.sparse_ffn")
predictor = importlib.import_module("real.kernels.predictor")
add_norm = importlib.import_module("real.kernels.add_norm")


def _signature(fn, consts: dict, types: dict) -> dict:
    return {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}


# how a launch from torch specializes the integer arguments at real shapes (contiguous rows, d_model, ranks and
# strides multiples of 16): unit strides become the constant 1, the others are known divisible by 16
UNIT_STRIDES = {"s_ud", "s_gd", "s_dd", "s_ar", "s_bn"}
ALIGNED_INTS = {"stride_xt", "s_ur", "s_gr", "s_dr", "stride_yt", "D", "s_ak", "K", "R", "K_CHUNK", "s_br", "N",
                "s_x", "s_r", "s_o", "s_res", "s_copy"}


def compile_one(fn, consts: dict, types: dict, num_warps: int):
    """Compile as a launch from torch specializes: unit strides become constants, pointers and the aligned
    integers are marked divisible by 16 (do_not_specialize arguments excepted). Without this the compiler
    cannot vectorize row loads, and the kernel it builds differs from the one that runs (the 4-row early
    launch spilled 4 KB per thread unspecialized)."""
    names = list(fn.arg_names)
    plain = set(getattr(fn, "do_not_specialize", ()) or ())
    plain |= {names[i] for i in plain if isinstance(i, int)}
    consts = dict(consts, **{n: 1 for n in names if n in UNIT_STRIDES and n not in plain and n not in consts})
    aligned = {n for n in names if n in ALIGNED_INTS and n not in plain}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (types.get(n, "").startswith("*") or n in aligned)}
    src = ASTSource(fn=fn, signature=_signature(fn, consts, types), constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 1})


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
MAX_SPILL_BYTES = 128     # per thread: a few spilled values (the 8-token launches: 24-64 B); a spilled tile: KBs


def resources(compiled) -> tuple[int, int] | None:
    """(registers, stack bytes) per thread of the cubin, from triton's cuobjdump; None where it has none."""
    if not CUOBJDUMP.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    fields = dict(f.split(":", 1) for line in out.splitlines() if "REG:" in line for f in line.split()
                  if ":" in f and f.split(":", 1)[1].isdigit())
    return (int(fields["REG"]), int(fields["STACK"])) if "REG" in fields and "STACK" in fields else None


def check_pdl_order(ptx: str, pdl: int) -> str | None:
    """None if the PTX orders loads as the PDL level promises, else what is wrong."""
    if pdl == 0:
        return None
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0:
        return "no griddepcontrol.wait"
    before = ptx[:wait].count("ld.global")
    if pdl == 1 and before:
        return f"{before} global loads before the wait (PDL 1 must read nothing before it)"
    if pdl == 2 and not before:
        return "no global load before the wait (PDL 2 requests its first blocks there)"
    return None


_ZERO_CONST = re.compile(r"(%[\w.]+) = arith\.constant dense<0\.0+e\+00> : tensor<[^>]*xf32, (#\w+)>")
_F32_READ = re.compile(r"= tt\.(?:load|atomic_rmw) .*tensor<[^>]*x!tt\.ptr<f32>, (#\w+)>")
_F32_STORE = re.compile(r"tt\.store %[\w.]+, (%[\w.]+)(?:, %[\w.]+)? : tensor<[^>]*x!tt\.ptr<f32>, (#\w+)>")


def check_zeroing(ttgir: str) -> str | None:
    """None, or what is wrong: a store of fp32 zeros after an fp32 read (load or atomic) in another thread
    layout with no barrier between. Kernels that read a sum and leave it zeroed (add+norm's consume, the
    drain) rely on each element being read before it is zeroed; the compiler may give the read and the zero
    store different layouts (the read takes its consumer's 8 per thread, the constant store 4), so another
    warp can zero an element before its reader loads it. Seen on the H200, 2026-12-02: add+norm consuming 2
    copies with 16 warps lost part of the FFN's sum (benchmarks/probes/copies_repro.py)."""
    zeros = dict(_ZERO_CONST.findall(ttgir))
    reads: list[str] = []
    for line in ttgir.splitlines():
        if "gpu.barrier" in line:
            reads.clear()
        elif (m := _F32_READ.search(line)) is not None:
            reads.append(m.group(1))
        elif (m := _F32_STORE.search(line)) is not None and m.group(1) in zeros:
            other = sorted({lay for lay in reads if lay != m.group(2)})
            if other:
                return (f"zeros stored in layout {m.group(2)} after fp32 reads in {', '.join(other)} with no "
                        f"barrier between: a warp may zero elements another has not read yet")
    return None


def stream_cases():
    f16 = {n: "*fp16" for n in ("x_ptr", "up_ptr", "gate_ptr", "down_ptr", "bias_ptr", "out_bias_ptr", "y_ptr")}
    types = dict(f16, idx_ptr="*i32", count_ptr="*i32", acc_ptr="*fp32", sem_ptr="*i32")
    for pdl, has_idx, gated, block_t, finish in itertools.product((0, 1, 2), (True, False), (False, True),
                                                                   (1, 8), (True, False)):
        if pdl == 2 and block_t > 1:
            continue                       # early launches take one token (the kernel static-asserts it)
        block_r, warps = (4, 8) if not gated else (2, 16)
        consts = dict(HAS_IDX=has_idx, COUNT_ON_DEVICE=has_idx and pdl != 2, HAS_BIAS=not gated,
                      HAS_OUT_BIAS=True, GATED=gated, ACT=0, BLOCK_T=block_t, BLOCK_E=4096, BLOCK_R=block_r,
                      BLOCK_D=4096, N_ACC=1 if finish else 4, PROGS_PER_SM=1, FENCE=True,
                      FINISH=finish, PDL=pdl)   # accumulating: into 4 copies of the sum (accumulate=)
        yield (f"_stream_kernel PDL={pdl} idx={has_idx} gated={gated} T={block_t} finish={finish}",
               sparse._stream_kernel, consts, types, warps, pdl)


def two_phase_cases():
    for dtype in ("fp16", "bf16"):       # the several-token finish: reads the sums, writes y, zeroes the sums
        yield (f"_drain_kernel {dtype}", sparse._drain_kernel, dict(BLOCK=sparse.DRAIN_BLOCK),
               dict(acc_ptr="*fp32", y_ptr=f"*{dtype}"), 4, 0)
    for dtype, tf32, block_t in ((d, t, b) for d in ("fp16", "bf16") for t, b in ((False, 1), (False, 16), (True, 16))):
        types = dict(h_ptr="*fp32", down_ptr=f"*{dtype}", out_bias_ptr=f"*{dtype}", idx_ptr="*i32",
                     count_ptr="*i32", acc_ptr="*fp32", sem_ptr="*i32", y_ptr=f"*{dtype}")
        consts = dict(HAS_IDX=True, COUNT_ON_DEVICE=True, HAS_OUT_BIAS=True, BLOCK_T=block_t, BLOCK_E=4096,
                      BLOCK_R=32, BLOCK_D=256, FENCE=True, FINISH=block_t == 1, TF32=tf32)
        yield f"_down_kernel {dtype} T={block_t} tf32={tf32}", sparse._down_kernel, consts, types, 8, 0
    for block_t in (1, 16):
        types = {n: "*fp16" for n in ("x_ptr", "up_ptr", "gate_ptr", "bias_ptr")}
        types.update(idx_ptr="*i32", count_ptr="*i32", h_ptr="*fp32")
        consts = dict(HAS_IDX=True, COUNT_ON_DEVICE=True, HAS_BIAS=True, GATED=False, ACT=0, BLOCK_T=block_t,
                      BLOCK_R=16, BLOCK_D=256)
        yield f"_hidden_kernel T={block_t}", sparse._hidden_kernel, consts, types, 4, 0


def predictor_cases():
    for pdl, block_t in itertools.product((False, True), (1, 16)):
        types = dict(x_ptr="*fp16", a_ptr="*fp16", z_ptr="*fp32", count_ptr="*i32")
        one = {"T": 1} if block_t == 1 else {}        # T == 1 is specialized to a constant at batch 1
        consts = dict(BLOCK_T=block_t, BLOCK_RR=16, BLOCK_K=256, SPLIT_K=8, PDL=pdl, **one)
        # with PDL both request their weights (A's first tile; B's block and the bias) before the wait: level 2
        yield f"_lowrank_kernel T={block_t} pdl={pdl}", predictor._lowrank_kernel, consts, types, 4, 2 * pdl
        types = dict(z_ptr="*fp32", b_ptr="*fp16", bias_ptr="*fp16", idx_ptr="*i32", count_ptr="*i32",
                     threshold="fp32")
        consts = dict(BLOCK_T=block_t, R_PAD=128, BLOCK_N=256, SPLIT_K=8, HAS_BIAS=True, PDL=pdl, **one)
        yield f"_select_kernel T={block_t} pdl={pdl}", predictor._select_kernel, consts, types, 8, 2 * pdl


def add_norm_cases():
    for rms, consume, pdl in itertools.product((False, True), (False, True), (False, True)):
        x = "*fp32" if consume else "*fp16"          # consume: x is the FFN's fp32 sum, read and zeroed
        types = dict(x_ptr=x, r_ptr="*fp16", w_ptr="*fp16", b_ptr="*fp16", out_ptr="*fp16", res_ptr="*fp16",
                     eps="fp32")
        # consume: the FFN's sum in 1, 2 or 4 copies, with each of the tuner's warp counts (the zeroing check)
        for copies, warps in ((1, 4), (1, 16), (2, 8), (2, 16), (4, 16)) if consume else ((1, 8),):
            consts = dict(RMS=rms, HAS_W=True, HAS_B=not rms, CONSUME=consume, BLOCK=4096, PDL=pdl, COPIES=copies)
            yield (f"_add_norm_kernel rms={rms} consume={consume} pdl={pdl} copies={copies} w{warps}",
                   add_norm._add_norm_kernel, consts, types, warps, int(pdl))


def main() -> int:
    failures = 0
    for name, fn, consts, types, warps, pdl in itertools.chain(stream_cases(), two_phase_cases(), predictor_cases(),
                                                                     add_norm_cases()):
        t0 = time.perf_counter()
        used = ""
        try:
            compiled = compile_one(fn, consts, types, warps)
            problem = check_pdl_order(compiled.asm["ptx"], pdl) or check_zeroing(compiled.asm["ttgir"])
            res = resources(compiled)
            if res is not None:
                used = f", {res[0]} registers, {res[1]} B stack"
                if problem is None and res[1] > MAX_SPILL_BYTES:
                    problem = f"{res[1]} bytes of stack per thread: registers spilled (limit {MAX_SPILL_BYTES})"
        except Exception as e:  # noqa: BLE001 - report every specialization, then fail
            if "ptxas" in str(e) and "not found" in str(e).lower():
                print(f"no ptxas here, nothing compiled: {e}")
                return NO_TOOLCHAIN
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        failures += problem is not None
        print(f"{'FAIL' if problem else 'ok  '} {name} ({time.perf_counter() - t0:.1f} s{used})" +
              (f": {problem}" if problem else ""), flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
