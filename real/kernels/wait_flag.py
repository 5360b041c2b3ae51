"""Hold a CUDA stream until a host thread sets a flag: one program polls an int32 in pinned host memory.

Why: after a layer's flash reads the engine's host is slow to issue the next calls (on the H100 machine a call
right after a ~7 ms wait costs 2-4x its usual host time, benchmarks/probes/results/post_read.txt). With this kernel the host
queues the copy of the staged rows and the FFN over them *before* the reads end; the reader threads set the
flag when the last read returns, and the device goes on by itself.

The poll is bounded by a count (``max_polls``; a poll of host memory takes ~1-2 us over the H100 machine's
PCIe, less on a faster link): a flag that is never set does not hang the device; the kernel then sets
``timed_out`` (a device int32 the caller checks) to 1. It never clears it: one wait that gave up is still
reported after later waits succeeded.
"""

from __future__ import annotations

import torch

from real.kernels._launch import triton

MAX_POLLS = 1 << 22          # ~4-8 s of polling at ~1-2 us per load of host memory

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["value", "max_polls"])
    def _wait_flag(flag_ptr, value, max_polls, timed_out_ptr):
        v = tl.load(flag_ptr, volatile=True)
        i = 0
        while (v < value) & (i < max_polls):
            v = tl.load(flag_ptr, volatile=True)
            i += 1
        tl.store(timed_out_ptr, 1, mask=v < value)        # sticky: a later wait does not clear it


def check_wait_args(flag: torch.Tensor, timed_out: torch.Tensor) -> None:
    """Validate once what ``launch_wait`` takes on trust (it runs once per layer on the engine's path)."""
    if flag.dtype != torch.int32 or flag.numel() != 1 or not flag.is_pinned():
        raise ValueError("flag: expected a pinned int32 host tensor of one element (torch.zeros(1, "
                         "dtype=torch.int32, pin_memory=True))")
    if timed_out.dtype != torch.int32 or timed_out.numel() != 1 or not timed_out.is_cuda:
        raise ValueError("timed_out: expected an int32 CUDA tensor of one element")
    if triton is None:
        raise RuntimeError("wait_flag needs triton (a CUDA device and the compiled kernel)")


def launch_wait(flag: torch.Tensor, value: int, timed_out: torch.Tensor, max_polls: int = MAX_POLLS) -> None:
    """``wait_flag`` without the argument checks (see ``check_wait_args``)."""
    _wait_flag[(1,)](flag, int(value), int(max_polls), timed_out, num_warps=1)


def wait_flag(flag: torch.Tensor, value: int, timed_out: torch.Tensor, max_polls: int = MAX_POLLS) -> None:
    """Queue on the current stream: wait until ``flag[0] >= value`` (flag: int32, pinned host memory, set by
    another thread; values only grow). ``timed_out``: int32 [1] on the device, set to 1 if the poll gave up
    (and left as it is otherwise)."""
    check_wait_args(flag, timed_out)
    launch_wait(flag, value, timed_out, max_polls)
