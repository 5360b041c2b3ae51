"""Host time of each call the engine makes after a layer's reads (copy, insert, FFN over the new
rows), one at a time, on OPT-6.7B shapes: what ``benchmarks/probes/profile_engine.py``'s 'copy', 'insert'
and 'ffn_new' phases are made of. No flash involved.

    python benchmarks/probes/profile_post_read.py [--rows 390] [--reps 200]

Per call: host microseconds per call while the device is kept busy (the host's own cost: launch
path, Python), per call with a device sync after each (host + device), and host microseconds of a
call issued while the device is idle, as in the engine after a layer's reads ('idle us'), also right
after the thread slept or spun 7 ms (a layer's wait for its reads), or slept 7 ms while launching a
one-element kernel, or the call itself, every 0.5 or 2 ms. Prints a table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from real.engine import Clock, IndexUpload, ffn_rows  # noqa: E402
from real.kernels._launch import set_direct_dispatch  # noqa: E402
from real.loader import HostBuffer  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402


def host_us(fn, reps: int, keep_busy: bool = True) -> tuple[float, float]:
    """(host us per call, host+device us per call with a sync after each). keep_busy: a long sleep
    kernel first, so the host-side loop never waits for the device (its own cost only)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    if keep_busy and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(50e6))
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
        torch.cuda.synchronize()
    return host * 1e6, (time.perf_counter() - t) / reps * 1e6


def idle_us(fn, reps: int) -> float:
    """Host us of one call issued while the device is idle (a sync before each call, not timed): the
    engine's case after a layer's reads, where nothing is queued ahead of the copy and the FFN."""
    total = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
    torch.cuda.synchronize()
    return total / reps * 1e6


def after_wait_us(fn, reps: int, seconds: float, spin: bool, keepalive_s: float = 0.0,
                  rehearse: bool = False) -> float:
    """Host us of one call issued, device idle, right after the host thread waited ``seconds`` (as it
    waits ~7 ms for a layer's reads): blocked in the OS (``spin=False``: sleep) or busy (a spin loop);
    ``keepalive_s`` > 0: sleeping, but launching a one-element kernel (``rehearse``: calling ``fn``
    itself, so its own code path stays in the CPU's caches) every ``keepalive_s``."""
    total = 0.0
    one = torch.zeros(1, device="cuda")
    for _ in range(reps):
        torch.cuda.synchronize()
        end = time.perf_counter() + seconds
        if spin:
            while time.perf_counter() < end:
                pass
        elif keepalive_s:
            while (left := end - time.perf_counter()) > 0:
                fn() if rehearse else one.add_(1)
                time.sleep(min(keepalive_s, left))
        else:
            time.sleep(seconds)
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
    torch.cuda.synchronize()
    return total / reps * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=390, help="new neurons per layer (OPT-6.7B, 2.4%% of 16384)")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    spec = ModelSpec.preset("opt-6.7b")
    d, n, w = spec.d_model, args.rows, 2 * spec.d_model
    nbytes = n * w * 2
    stage = HostBuffer(nbytes, pinned=True)
    raw = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    fresh_pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    rows = (torch.randn(n, w, device=dev) * 0.02).half()
    x = torch.randn(1, d, device=dev).half()
    bias = torch.zeros(n, device=dev, dtype=torch.float16)
    y0 = torch.randn(1, d, device=dev).half()
    clock = Clock(dev)
    # the engine's steady state: events come from the pool (settle() refills it after each token)
    clock._free = [torch.cuda.Event(enable_timing=True) for _ in range(4 * (args.reps + 5))]
    upload = IndexUpload(dev, 4 * spec.d_ff)
    idx_np = np.random.default_rng(0).choice(spec.d_ff, n, replace=False).astype(np.int64)
    from real.kernels.sparse_ffn import sparse_ffn
    ffn_rows(x, rows[:, :d], rows[:, d:], bias=bias)      # tunes this shape
    tuned = tuned_config()
    cases = [
        ("copy_ from HostBuffer view (pinned)", lambda: raw.copy_(stage.tensor[:nbytes], non_blocking=True)),
        ("copy_ from a fresh pinned tensor", lambda: raw.copy_(fresh_pinned, non_blocking=True)),
        ("ffn_rows, all rows (ffn_new), direct", lambda: ffn_rows(x, rows[:, :d], rows[:, d:], bias=bias)),
        ("sparse_ffn, tuned config fixed", lambda: sparse_ffn(x, rows[:, :d], rows[:, d:], bias=bias,
                                                               config=tuned)),
        ("y + y_new", lambda: y0 + y0),
        ("Clock.start + stop", lambda: clock.stop("io_s", clock.start(), _Sink())),
        ("IndexUpload of one index array", lambda: upload(idx_np), False),   # its ring waits on the device
        ("empty launch: torch.add_ on 1 elem", lambda: y0[:, :1].add_(0)),
    ]
    print(f"# host cost of post-read calls; {torch.cuda.get_device_name()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{n} rows x {w} fp16 ({nbytes / 1e6:.1f} MB); stage pinned: {stage.tensor.is_pinned()}")
    waits = [("after 7ms sleep", dict(spin=False)), ("after 7ms spin", dict(spin=True))] + \
        [(f"7ms, kernel/{k:g}ms", dict(spin=False, keepalive_s=k / 1e3)) for k in (0.5, 2)] + \
        [(f"7ms, itself/{k:g}ms", dict(spin=False, keepalive_s=k / 1e3, rehearse=True)) for k in (0.5, 2)]
    print(f"{'call':<40} {'host us':>9} {'host+sync us':>13} {'idle us':>8}" + "".join(f"{w:>18}" for w, _ in waits))
    for label, fn, *busy in cases:
        h, s = host_us(fn, args.reps, *busy)
        after = [after_wait_us(fn, args.reps // 4, 0.007, **kw) for _, kw in waits]
        print(f"{label:<40} {h:9.1f} {s:13.1f} {idle_us(fn, args.reps):8.1f}" + "".join(f"{a:18.1f}" for a in after),
              flush=True)
        clock.sync()
        clock.settle()                   # the engine's end of token: spans credited, events back to the pool
    set_direct_dispatch(False)       # every launch through Triton's autotuner, as before 2026-11-23 15:40 UTC
    h, s_ = host_us(lambda: ffn_rows(x, rows[:, :d], rows[:, d:], bias=bias), args.reps)
    print(f"{'ffn_rows, all rows, autotuner dispatch':<40} {h:9.1f} {s_:13.1f}", flush=True)
    set_direct_dispatch(True)
    return 0


def tuned_config() -> dict:
    """The persistent kernel's autotuned choice for one token, as a fixed config (block sizes + warps/stages);
    call after one autotuned launch of that shape."""
    from real.kernels.sparse_ffn import STREAM
    c = STREAM.best_config("one")
    if c is None:
        raise RuntimeError("the sparse FFN kernel has not been tuned for one token yet: launch it once first")
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


class _Sink:
    io_s = 0.0


if __name__ == "__main__":
    sys.exit(main())
