"""Where a kernel runs: compiled Triton on CUDA, the Triton interpreter on CPU (tests), or plain torch.

Triton decides at import whether `@triton.jit` builds compiled or interpreted functions (TRITON_INTERPRET,
read once; its own library functions such as tl.sum follow the same switch). So a CPU run through the
interpreter needs TRITON_INTERPRET=1 set before triton is first imported; without it CPU tensors take the
plain-torch reference, which is also the fallback on machines without triton or without a GPU.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

try:  # triton is Linux-only; without it every op falls back to its torch reference
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None


def interpreting() -> bool:
    """True when CPU tensors go through the Triton interpreter: TRITON_INTERPRET=1, set before triton was
    first imported (if it was set later, triton's own functions are compiled-only and CPU tensors take the
    torch reference instead)."""
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if not isinstance(tl.standard.sum, InterpretedFunction):
        return False
    _fix_interpreter()
    return True


def _fix_interpreter() -> None:
    """Three bugs of Triton 3.6's CPU interpreter, patched here for the tests (compiled kernels are untouched):
    it turns scalar tensors into ints with int(1-element array), which numpy >= 2.4 rejects (so
    `range(0, D, BLOCK)` over a kernel argument fails); and its tl.dot multiplies bfloat16 operands as their raw
    uint16 bit patterns (it widens only 8-bit floats); and it truncates fp32 -> bf16 where the GPU rounds to
nearest even. Idempotent."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "numpy2_index", False):
        return
    builder = type(interpreter.interpreter_builder)
    original_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    builder.create_dot = lambda self, a, b, d, *rest: original_dot(self, widen(a), widen(b), d, *rest)
    original_cast = builder.cast_impl

    def cast(self, src, dst_type):  # fp32 -> bf16 with round-to-nearest-even, as the GPU's cvt.rn.bf16.f32
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(bits.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast  # create_fp_trunc & co. call self.cast_impl

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.numpy2_index = True
    interpreter._patch_lang_tensor = patched


def backend_for(t: torch.Tensor, impl: str = "auto") -> str:
    """'triton' (compiled), 'interpret' (Triton interpreter on CPU) or 'torch' (the reference).

    impl='auto' picks from the device; impl='torch' forces the reference; impl='triton' demands a kernel and
    fails clearly when none can run (CPU tensor without TRITON_INTERPRET=1).
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl: unknown value {impl!r}. Fix: use 'auto', 'torch' or 'triton'")
    if impl == "torch" or triton is None:
        if impl == "triton":
            raise RuntimeError("impl='triton': triton is not installed. Fix: install triton or use impl='auto'")
        return "torch"
    if t.is_cuda:
        return "triton"
    if interpreting():
        return "interpret"
    if impl == "triton":
        raise RuntimeError("impl='triton' on a CPU tensor needs the Triton interpreter: TRITON_INTERPRET=1 set "
                           "before triton is first imported. Fix: set it in the environment, move the tensors "
                           "to CUDA, or use impl='auto'")
    return "torch"


_FLUSH: dict = {}   # device index -> a 512 MiB buffer that tuning reads to empty the L2 between runs
TUNING_RUNS = 40


def _bench(kernel_call, quantiles):
    """Autotuning's timer: GPU time of `kernel_call`, each run after a READ of 512 MiB, so the run finds no
    weights in L2 and no dirty lines to write back. triton's do_bench flushes with a 256 MB memset instead,
    whose dirty lines the timed kernel then writes back: for the ~10 us sparse FFN that noise picked configs
    up to 1.5x slower than the best one timed by CUDA-graph replay (H200, 2026-12-02:
    docs/kernels_notes.md). The read (~130 us) also keeps the host's launch ahead of the GPU."""
    dev = torch.cuda.current_device()
    flush = _FLUSH.get(dev)
    if flush is None:
        flush = _FLUSH[dev] = torch.ones(1 << 27, dtype=torch.int32, device="cuda")
    kernel_call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TUNING_RUNS)]
    for start, end in events:
        flush.sum()
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in events])
    if quantiles is None:
        return float(times.median())
    return [float(q) for q in torch.quantile(times, torch.tensor(list(quantiles)))]


KERNELS: list["Kernel"] = []     # every Kernel made, for set_direct_dispatch


def set_direct_dispatch(on: bool) -> None:
    """Switch every kernel's direct dispatch (see Kernel) on or off: benchmarks compare the two."""
    for k in KERNELS:
        k.direct_dispatch = bool(on)


class Kernel:
    """One @triton.jit kernel, launched autotuned over `configs` on CUDA or with a fixed config when interpreted.

    configs: {mode: [triton.Config, ...]}; the caller picks a mode per launch (e.g. one set of block sizes for
    one token, another for the tensor-core path). `default` gives each mode's config for the interpreter,
    which cannot time anything and so cannot tune.
    """

    def __init__(self, jit_fn, configs: dict[str, Sequence[Any]], default: dict[str, dict[str, int]],
                 key: Sequence[str], reset_to_zero: Sequence[str] = (), prune=None,
                 restore_value: Sequence[str] = ()):
        self.jit_fn, self.configs, self.default, self.key = jit_fn, configs, default, list(key)
        self.prune = prune  # early_config_prune(configs, named_args, **kwargs) -> configs
        self.reset_to_zero = list(reset_to_zero)  # outputs that accumulate across runs: zeroed between tuning runs
        self.restore_value = list(restore_value)  # inputs a launch may overwrite: restored after each tuning run
        self._tuned: dict[str, Any] = {}
        # direct dispatch: (mode, key args, constexpr kwargs, tensor dtypes) -> the tuned config, so a
        # repeated shape skips the autotuner's per-call Python (~130 us of host time per launch on the
        # H100 machine's host, post_read_run1.txt, in git history at cd7dc41) and launches the jit function with that config
        self._direct: dict[tuple, Any] = {}
        self._last: dict[str, Any] = {}
        self._key_pos: list[int] | None = None
        self.direct_dispatch = True
        KERNELS.append(self)

    def _dispatch_key(self, mode: str, args: tuple, kwargs: dict) -> tuple | None:
        """A key at least as fine as the autotuner's (its key args and the dtypes of tensor args, plus
        every keyword argument), or None when some value cannot be hashed (then the autotuner decides)."""
        if self._key_pos is None:
            names = getattr(self.jit_fn, "arg_names", None)
            if names is None:            # cannot map positional key args: leave every launch to the autotuner
                self.direct_dispatch = False
                return None
            self._key_pos = [list(names).index(k) for k in self.key if k in names]
        if any(hasattr(v, "dtype") for v in kwargs.values()):
            return None                  # a tensor keyword would make every call a new key
        try:
            key = (mode, tuple(args[i] if i < len(args) else kwargs.get(self.jit_fn.arg_names[i])
                               for i in self._key_pos),
                   tuple(sorted(kwargs.items())), tuple(a.dtype for a in args if hasattr(a, "dtype")))
            hash(key)
        except TypeError:
            return None
        return key

    def launch(self, backend: str, mode: str, grid, *args, config: dict | None = None, **kwargs):
        """Run the kernel. `config` (block sizes, num_warps, num_stages) bypasses autotuning."""
        if backend == "interpret":
            meta = dict(self.default[mode] if config is None else config)
            meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
            return self.jit_fn[grid](*args, **kwargs, **meta)
        if config is not None:
            return self.jit_fn[grid](*args, **kwargs, **config)
        key = self._dispatch_key(mode, args, kwargs) if self.direct_dispatch else None
        chosen = self._direct.get(key) if key is not None else None
        if chosen is not None:
            self._last[mode] = chosen
            return self.jit_fn[grid](*args, **kwargs, **chosen.all_kwargs())
        if mode not in self._tuned:
            self._tuned[mode] = triton.autotune(configs=list(self.configs[mode]), key=self.key,
                                                reset_to_zero=self.reset_to_zero or None,
                                                restore_value=self.restore_value or None, do_bench=_bench,
                                                prune_configs_by={"early_config_prune": self.prune}
                                                if self.prune else None)(self.jit_fn)
        tuned = self._tuned[mode]
        ret = tuned[grid](*args, **kwargs)
        chosen = getattr(tuned, "best_config", None)
        if chosen is not None:
            self._last[mode] = chosen
            if key is not None and chosen.pre_hook is None:    # a pre-hook must run through the autotuner
                self._direct[key] = chosen
        return ret

    def best_config(self, mode: str):
        """The config the last tuned launch of `mode` used (for benchmark notes); None before any."""
        return self._last.get(mode)


_PDL_CAPABLE: dict = {}   # device index -> compute capability >= 9.0


def pdl_args(level: int, backend: str) -> dict:
    """Launch arguments for programmatic dependent launch: the kernel's PDL constexpr (its meaning is the
    kernel's; 0 = off) and Triton's launch_pdl. Compiled kernels only: the interpreter has no griddepcontrol.
    griddepcontrol needs compute capability 9.0 (Hopper) or newer: older GPUs get a clear error."""
    if not level or backend != "triton":
        return {}
    dev = torch.cuda.current_device()
    if dev not in _PDL_CAPABLE:
        _PDL_CAPABLE[dev] = torch.cuda.get_device_capability(dev) >= (9, 0)
    if not _PDL_CAPABLE[dev]:
        major, minor = torch.cuda.get_device_capability(dev)
        raise ValueError(f"pdl: programmatic dependent launch needs compute capability 9.0+ (Hopper), this GPU "
                         f"is {major}.{minor}. Fix: pass pdl=False")
    return {"PDL": level, "launch_pdl": True}


def configs(rows: Sequence[tuple], names: Sequence[str]) -> list:
    """triton.Config list from tuples (block sizes..., num_warps, num_stages)."""
    if triton is None:  # pragma: no cover
        return []
    out = []
    for row in rows:
        *blocks, warps, stages = row
        out.append(triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages))
    return out


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
