"""Measure this machine's flash, memory and compute into a HardwareProfile YAML (and a plot).

    python -m real.calibrate DIR [--quick] [--name NAME] [--out conf/hardware/NAME.yaml]

DIR is a directory on the disk to measure; a test file is created there and read with O_DIRECT
(page cache bypassed): random-read throughput over read sizes 4 KiB..4 MiB x reads in flight
1..64, single-read latency, sequential throughput. Then host-to-device bandwidth (pinned and
pageable, on a GPU), memory-copy bandwidth and a decode matvec's weight-streaming rate where the
neuron cache lives (the GPU if there is one), and the fixed costs the simulator charges (op launch,
read-batch overhead, bookkeeping per row). ``--quick`` keeps the whole table but measures each
cell briefly and uses a smaller file: under a minute. The YAML goes by default to
conf/hardware/NAME.yaml, so ``python -m experiments.run hardware=NAME`` loads it."""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import os
import platform
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.hardware import HardwareProfile
from sim.layout import ALIGN
from sim.presets import CONF_DIR

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
READ_KIB = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DEPTHS = [1, 2, 4, 8, 16, 32, 64]
TEST_FILE = "flashlab-calibrate.bin"


@dataclass(frozen=True)
class Effort:
    file_mib: int
    cell_seconds: float       # time per (size, depth) cell and pass
    passes: int               # passes over the whole table, in alternating order; each cell keeps its median
    latency_reads: int
    seq_mib: int
    repeats: int               # timed repetitions of memory/compute probes (median kept)


# Three passes, not one longer look: a shared virtual disk stalls for a fraction of a second now and then, and a
# single 0.1 s window that catches a stall set one cell to a third of its neighbours (a fresh H100 VM, 2026-12-07:
# 16 KiB at 32 in flight read 0.29 GB/s between 0.88 and 1.00), and that cell alone moved predictions 2x.
QUICK = Effort(file_mib=512, cell_seconds=0.1, passes=3, latency_reads=300, seq_mib=256, repeats=5)
FULL = Effort(file_mib=4096, cell_seconds=0.25, passes=3, latency_reads=2000, seq_mib=2048, repeats=20)


# ---- flash -----------------------------------------------------------------------------------------
def aligned_buffer(nbytes: int) -> memoryview:
    import mmap
    return memoryview(mmap.mmap(-1, max(ALIGN, -(-nbytes // ALIGN) * ALIGN)))


def open_direct(path: str | Path) -> tuple[int, bool]:
    """O_DIRECT fd if the filesystem allows it, else a buffered one (and False)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [aligned_buffer(ALIGN)], 0)
            return fd, True
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EINVAL:
                raise
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    warnings.warn(f"O_DIRECT is not supported for {path}: measuring buffered reads (page cache NOT bypassed; "
                  "numbers are not the disk's)", RuntimeWarning, stacklevel=2)
    return os.open(path, os.O_RDONLY), False


def make_test_file(path: str | Path, nbytes: int, chunk: int = 64 * MIB) -> float:
    """Write ``nbytes`` of random data (incompressible, never zeros) and fsync; returns write GB/s."""
    rng = np.random.default_rng(12345)
    block = rng.integers(0, 256, size=chunk, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < nbytes:
            n = min(chunk, nbytes - done)
            block[:8] = np.frombuffer(np.int64(done).tobytes(), dtype=np.uint8)   # no two chunks alike
            f.write(memoryview(block)[:n])
            done += n
        os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - t0) / 1e9


def random_read_gbps(path: str | Path, size: int, depth: int, seconds: float, min_reads: int = 0,
                     seed: int = 0, staged_bytes: int = 0) -> float:
    """The raw probe: ``depth`` threads, each issuing O_DIRECT preads of ``size`` bytes at random
    4 KiB-aligned offsets back to back; aggregate GB/s over the wall time.

    By default each thread reuses one buffer (as fio does). With ``staged_bytes`` the reads land in
    successive places of a pre-touched buffer of that size (split among the threads), as a loader's
    staging does: on some virtualized disks that is markedly faster for large reads
    (docs/storage.md), so a profile for the real backend there should be measured this way."""
    fd, _ = open_direct(path)
    try:
        span = (os.fstat(fd).st_size - size) // ALIGN
        if span <= 0:
            raise ValueError(f"{path} is smaller than one {size}-byte read")
        per_thread = max(1, -(-min_reads // depth))
        total = [0] * depth
        start = threading.Barrier(depth + 1)
        stop_at = [0.0]
        errors: list[BaseException] = []

        slots = max(1, staged_bytes // depth // size)

        def worker(k: int) -> None:
            buf = aligned_buffer(size * slots)
            if slots > 1:
                buf[:] = b"\1" * buf.nbytes          # pre-touched, like a staging buffer in use
            views = [buf[j * size:(j + 1) * size] for j in range(slots)]
            rng = np.random.default_rng([seed, size, depth, k])
            offs = (rng.integers(0, span + 1, size=4096) * ALIGN).tolist()
            start.wait()
            n, i, deadline = 0, 0, stop_at[0]
            try:
                while n < per_thread or time.perf_counter() < deadline:
                    got = os.preadv(fd, [views[n % slots]], offs[i])
                    if got != size:
                        raise OSError(errno.EIO, f"short read {got} of {size} at {offs[i]}")
                    n += 1
                    i = (i + 1) & 4095
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            total[k] = n

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        t0 = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return sum(total) * size / elapsed / 1e9
    finally:
        os.close(fd)


def loader_read_gbps(path: str | Path, size: int, depth: int, seconds: float, min_reads: int = 0,
                     seed: int = 0, batch_bytes: int = 16 * MIB) -> float:
    """The probe through the engine's own reader: batches of random O_DIRECT reads of ``size`` bytes handed to a
    ``real.loader.ReadPool`` of ``depth`` (native reader threads where the C loop builds, as the engine's loader),
    two batches queued so the pool never idles between them; aggregate GB/s over the wall time, the last batch's
    drain included (a cell reads at least two batches, so where a batch is only ``depth`` large reads the drain
    weighs on it; at the engine's 16-48 KiB reads a batch is hundreds of reads).

    The raw probe (``random_read_gbps``: Python threads) and the engine's loader can read at different rates on the
    same disk; a table measured this way needs no loader/probe ratio carried from another machine."""
    from real.loader import ReadPool, open_flash_file

    f = open_flash_file(path)
    try:
        pool = ReadPool(depth)
    except BaseException:
        f.close()
        raise
    try:
        span = (os.fstat(f.fd).st_size - size) // ALIGN
        if span <= 0:
            raise ValueError(f"{path} is smaller than one {size}-byte read")
        n = max(depth, batch_bytes // size)
        buf = aligned_buffer(n * size)          # both queued batches land here: a probe keeps no data
        buf[:] = b"\1" * buf.nbytes            # pre-touched, like staging in use
        rng = np.random.default_rng([seed, size, depth])
        dst = (np.arange(n, dtype=np.int64) * size).tolist()

        def batch():
            off = (rng.integers(0, span + 1, size=n) * ALIGN).tolist()
            return pool.submit([f], buf, [0] * n, dst, off, [size] * n)

        t0 = time.perf_counter()
        deadline, done = t0 + seconds, 0
        queued = [batch(), batch()]
        while queued:
            pool.wait(queued.pop(0))
            done += n
            if time.perf_counter() < deadline or done + n * len(queued) < min_reads:
                queued.append(batch())
        return done * size / (time.perf_counter() - t0) / 1e9
    finally:
        pool.close()
        f.close()


READERS = {"loader": "through the engine's ReadPool (native reader threads where they build), batches of 16 MiB, "
                     "two queued",
           "threads": "Python threads, one reused buffer each"}


def read_table_passes(path: Path, read_kib: list[int], depths: list[int], effort: Effort, staged_bytes: int,
                      progress: bool, reader: str = "loader") -> np.ndarray:
    """[passes, sizes, depths] GB/s: the whole table ``effort.passes`` times, every other pass in reverse order, so a
    stall of the disk or a slow drift lands on different cells in different passes and the median drops it."""
    from tqdm import tqdm
    cells = [(i, j) for i in range(len(read_kib)) for j in range(len(depths))]
    out = np.zeros((effort.passes, len(read_kib), len(depths)))
    with tqdm(total=out.size, desc="random reads", unit="cell", disable=not progress) as bar:
        for p in range(effort.passes):
            for i, j in (cells if p % 2 == 0 else cells[::-1]):
                size, q, seed = read_kib[i] * KIB, depths[j], (p * 131 + i) * 97 + j
                out[p, i, j] = (loader_read_gbps(path, size, q, effort.cell_seconds, min_reads=2 * q, seed=seed)
                                if reader == "loader" else
                                random_read_gbps(path, size, q, effort.cell_seconds, min_reads=2 * q, seed=seed,
                                                 staged_bytes=staged_bytes))
                bar.update(1)
    return out


def table_spread(passes: np.ndarray) -> float:
    """How noisy the disk was: the median over cells of (max - min) / median across passes (0 with one pass)."""
    mid = np.median(passes, axis=0)
    return float(np.median((passes.max(axis=0) - passes.min(axis=0)) / np.maximum(mid, 1e-12)))


def read_latency_us(path: str | Path, reads: int, size: int = 4 * KIB, seed: int = 1) -> float:
    """Median time of one ``size`` read alone (nothing else in flight)."""
    fd, _ = open_direct(path)
    try:
        span = (os.fstat(fd).st_size - size) // ALIGN
        buf = aligned_buffer(size)
        offs = (np.random.default_rng(seed).integers(0, span + 1, size=reads) * ALIGN).tolist()
        times = []
        for off in offs:
            t0 = time.perf_counter()
            os.preadv(fd, [buf], off)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e6)
    finally:
        os.close(fd)


def sequential_gbps(path: str | Path, nbytes: int, chunk: int = 16 * MIB) -> float:
    fd, _ = open_direct(path)
    try:
        nbytes = min(nbytes, os.fstat(fd).st_size // chunk * chunk)
        buf = aligned_buffer(chunk)
        t0 = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.preadv(fd, [buf], off)
        return nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def batch_overhead_us(path: str | Path, reads: int = 200) -> float:
    """Fixed cost the loader adds to a batch of reads (hand-off to the pool, wake-ups, wait):
    the loader's median time for a one-read batch minus a bare pread of the same read."""
    from real.loader import ReadPool, open_flash_file

    f = open_flash_file(path)
    pool = ReadPool(8)
    buf = aligned_buffer(ALIGN)
    try:
        bare, batched = [], []
        for i in range(reads):
            off = (i * 7919 % 1024) * ALIGN
            t0 = time.perf_counter()
            os.preadv(f.fd, [buf], off)
            t1 = time.perf_counter()
            pool.run([f], buf, [0], [0], [off], [ALIGN])
            batched.append(time.perf_counter() - t1)
            bare.append(t1 - t0)
        return max(0.0, float(np.median(batched) - np.median(bare)) * 1e6)
    finally:
        pool.close()
        f.close()


# ---- memory and compute ------------------------------------------------------------------------------
def _median_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memory_and_compute(repeats: int, quick: bool) -> dict[str, float]:
    """mem_gbps (read + write bytes of a large copy), compute_gbps (weight bytes a decode matvec
    streams per second), compute_tflops, op_overhead_us, h2d_gbps and memory_gib where the neuron
    cache lives: the GPU if torch sees one, else host memory."""
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict[str, float] = {}
    n = (1 * GIB if cuda else 128 * MIB) // (2 if quick else 1)
    bufs = [torch.empty(n, dtype=torch.uint8, device=dev).random_(), torch.empty(n, dtype=torch.uint8, device=dev)]
    out["mem_gbps"] = 2 * n / _median_seconds(lambda: bufs[1].copy_(bufs[0]), repeats, sync) / 1e9
    bufs.clear()
    dtype = torch.float16 if cuda else torch.float32
    rows = 8192 if cuda else 4096
    mv = [torch.randn(rows, rows, dtype=dtype, device=dev), torch.randn(rows, dtype=dtype, device=dev)]
    t = _median_seconds(lambda: torch.mv(mv[0], mv[1]), repeats * 5, sync)
    out["compute_gbps"] = rows * rows * mv[0].element_size() / t / 1e9
    mv.clear()
    m = 8192 if cuda else 1024
    mm = [torch.randn(m, m, dtype=dtype, device=dev)]
    t = _median_seconds(lambda: mm[0] @ mm[0], max(3, repeats // 2), sync)
    out["compute_tflops"] = 2 * m ** 3 / t / 1e12
    mm.clear()
    tiny = torch.zeros(16, device=dev)
    launches = 2000

    def many() -> None:
        for _ in range(launches):
            tiny.add_(1.0)
    out["op_overhead_us"] = _median_seconds(many, 3, sync) / launches * 1e6
    if cuda:
        nb = 256 * MIB
        dst = torch.empty(nb, dtype=torch.uint8, device=dev)
        pinned = torch.empty(nb, dtype=torch.uint8, pin_memory=True).random_()
        pageable = torch.empty(nb, dtype=torch.uint8).random_()
        out["h2d_gbps"] = nb / _median_seconds(lambda: dst.copy_(pinned, non_blocking=True), repeats, sync) / 1e9
        out["h2d_pageable_gbps"] = nb / _median_seconds(lambda: dst.copy_(pageable), repeats, sync) / 1e9
        free, _total = torch.cuda.mem_get_info()
        out["memory_gib"] = free / GIB
        out["device"] = torch.cuda.get_device_name()
    else:
        out["h2d_gbps"] = 0.0
        out["memory_gib"] = _mem_available_gib()
        out["device"] = platform.processor() or platform.machine()
    return out


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KIB / GIB
    except OSError:
        pass
    return 16.0


def row_op_us(d_ff: int = 16384, rounds: int = 50) -> float:
    """Bookkeeping per neuron the memory manager touches: sim.plan.LayerCacheState's
    evict-and-insert on windowing-like churn (the very code the real engine runs)."""
    from sim.plan import LayerCacheState

    rng = np.random.default_rng(0)
    cap = d_ff // 2
    st = LayerCacheState(d_ff, cap)
    st.evict_and_insert(np.zeros(0, np.int64), np.arange(cap // 2, dtype=np.int64), "preallocated")
    touched, t = 0, 0.0
    for _ in range(rounds):
        resident = np.flatnonzero(st.row_of >= 0)
        evict = rng.choice(resident, size=min(400, resident.size), replace=False)
        absent = np.flatnonzero(st.row_of < 0)
        insert = np.sort(rng.choice(absent, size=400, replace=False))
        t0 = time.perf_counter()
        moves, _, _ = st.evict_and_insert(evict, insert, "preallocated")
        t += time.perf_counter() - t0
        touched += len(moves) + insert.size + evict.size
    return t / touched * 1e6


# ---- the whole run -------------------------------------------------------------------------------------
def calibrate(directory: str | Path, name: str, quick: bool = False, file_mib: int | None = None,
              read_kib: list[int] | None = None, depths: list[int] | None = None, keep_file: bool = False,
              progress: bool = True, log=print, staged_mib: int = 0,
              reader: str = "loader") -> tuple[HardwareProfile, dict]:
    """Run every probe; returns the profile and the raw measurements (for the plot and notes). ``reader``: the
    random-read table through the engine's loader (``loader``) or the raw Python-thread probe (``threads``)."""
    if reader not in READERS:
        raise ValueError(f"reader={reader!r}: use one of {sorted(READERS)}")
    if staged_mib and reader != "threads":
        raise ValueError("staged_mib shapes the Python-thread probe only. Fix: pass reader='threads' "
                         "(--reader threads) with it, or drop it (the loader reader stages like the engine)")
    effort = QUICK if quick else FULL
    read_kib = read_kib or READ_KIB
    depths = depths or DEPTHS
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TEST_FILE
    fbytes = (file_mib or effort.file_mib) * MIB
    from real.loader import default_read_threads       # which reader threads the loader reader runs (source line)

    t_start = time.perf_counter()
    log(f"writing {fbytes / MIB:.0f} MiB test file {path}")
    write_gbps = make_test_file(path, fbytes)
    try:
        _, direct = (lambda fd_d: (os.close(fd_d[0]), fd_d[1]))(open_direct(path))
        passes = read_table_passes(path, read_kib, depths, effort, staged_mib * MIB, progress, reader)
        table, spread = np.median(passes, axis=0), table_spread(passes)
        lat = read_latency_us(path, effort.latency_reads)
        seq = sequential_gbps(path, effort.seq_mib * MIB)
        io_over = batch_overhead_us(path)
    finally:
        if not keep_file:
            path.unlink(missing_ok=True)
    mc = memory_and_compute(effort.repeats, quick)
    rows = row_op_us()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    host = socket.gethostname()
    source = (f"python -m real.calibrate{' --quick' if quick else ''} on {host} ({mc['device']}), {date}; "
              f"file {fbytes // MIB} MiB in {directory}, {'O_DIRECT' if direct else 'BUFFERED (page cache!)'}"
              f"; random reads {READERS[reader]}{f', into a {staged_mib} MiB staging buffer' if staged_mib else ''}"
              f"{f' ({default_read_threads()} reader threads here)' if reader == 'loader' else ''}; "
              f"buffered write {write_gbps:.2f} GB/s; read table: median of {effort.passes} passes, "
              f"pass-to-pass spread {spread:.0%}"
              + (f"; pageable H2D {mc['h2d_pageable_gbps']:.1f} GB/s" if "h2d_pageable_gbps" in mc else ""))
    profile = HardwareProfile(
        name=name, read_kib=[float(k) for k in read_kib], depths=list(depths),
        read_gbps=[[round(float(v), 4) for v in row] for row in table],
        read_latency_us=round(lat, 2), seq_gbps=round(seq, 4), mem_gbps=round(mc["mem_gbps"], 2),
        compute_gbps=round(mc["compute_gbps"], 2), compute_tflops=round(mc["compute_tflops"], 3),
        h2d_gbps=round(mc["h2d_gbps"], 2), memory_gib=round(mc["memory_gib"], 2),
        op_overhead_us=round(mc["op_overhead_us"], 3), io_overhead_us=round(io_over, 2),
        row_op_us=round(rows, 4), overlap=True, read_probe=reader, source=source,
        sources=measured_sources(f"python -m real.calibrate{' --quick' if quick else ''} on {host} ({mc['device']}), "
                                 f"{date}", direct, reader))
    raw = {"direct": direct, "read_passes": passes.tolist(), "read_spread": spread,
           "write_gbps": write_gbps, "seconds": time.perf_counter() - t_start,
           "h2d_pageable_gbps": mc.get("h2d_pageable_gbps", 0.0), "device": mc["device"], "date": date}
    return profile, raw


def measured_sources(run: str, direct: bool, reader: str = "loader") -> dict[str, str]:
    """One source line per constant: which probe of this run measured it."""
    how = {
        "read_gbps": f"random reads ({'O_DIRECT' if direct else 'BUFFERED'}; {READERS[reader]}) over read size x "
                     "reads in flight, the median of its passes",
        "read_latency_us": "one 4 KiB O_DIRECT read alone, median",
        "seq_gbps": "sequential large O_DIRECT reads",
        "mem_gbps": "a large device-memory copy (bytes read + written)",
        "compute_gbps": "weight bytes a decode matvec (torch.mv) streams per second",
        "compute_tflops": "a large matrix product",
        "h2d_gbps": "pinned host-to-device copy of 256 MiB (0 on a CPU)",
        "memory_gib": "free memory where the neuron cache lives",
        "op_overhead_us": "2000 tiny ops back to back, per op",
        "io_overhead_us": "fixed cost of one batch of reads (submit, wait, wake-up)",
        "row_op_us": "the memory manager's bookkeeping per neuron (sim.plan.LayerCacheState)",
        "overlap": "the engine overlaps reads with compute (a design property, not measured)",
    }
    return {k: f"measured by {run}: {v}" if k != "overlap" else v for k, v in how.items()}


def save_profile(profile: HardwareProfile, out: str | Path, raw: dict) -> Path:
    """The YAML (with a comment header saying how it was measured) and a PNG plot beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Measured by python -m real.calibrate ({raw['date']}, {raw['seconds']:.0f} s): {raw['device']}.\n"
              f"# read_gbps[size][depth]: O_DIRECT random reads{'' if raw['direct'] else ' (BUFFERED)'}; "
              "plot beside this file.\n")
    profile.to_yaml(out, header=header)  # validated, then written atomically
    png = out.with_suffix(".png")
    plot_profile(profile, png)
    return png


def plot_profile(profile: HardwareProfile, png: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = np.asarray(profile.read_gbps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, q in enumerate(profile.depths):
        ax.plot(profile.read_kib, table[:, j], marker="o", ms=3, label=f"{q} in flight")
    ax.axhline(profile.seq_gbps, color="k", ls="--", lw=1, label=f"sequential {profile.seq_gbps:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(profile.read_kib)
    ax.set_xticklabels([f"{k:g}" if k < 1024 else f"{k / 1024:g}M" for k in profile.read_kib])
    ax.set_xlabel("read size (KiB)")
    ax.set_ylabel("random-read throughput (GB/s)")
    ax.set_title(f"{profile.name}: O_DIRECT random reads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m real.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="a directory on the disk to measure (a test file is created and removed)")
    ap.add_argument("--quick", action="store_true", help="brief cells and a 512 MiB file: under a minute")
    ap.add_argument("--name", default=None, help="profile name (default: calibrated-<hostname>)")
    ap.add_argument("--out", default=None, help="YAML path (default: conf/hardware/NAME.yaml)")
    ap.add_argument("--file-mib", type=int, default=None, help="test file size (default 512 quick / 4096)")
    ap.add_argument("--sizes-kib", default=None, help="comma list of read sizes (default 4..4096)")
    ap.add_argument("--depths", default=None, help="comma list of reads in flight (default 1..64)")
    ap.add_argument("--reader", default="loader", choices=sorted(READERS),
                    help="random-read table through the engine's loader (default: what the engine will read at) "
                         "or the raw Python-thread probe")
    ap.add_argument("--staged-mib", type=int, default=0,
                    help="reads land in distinct places of a buffer this big (as the loader's staging) instead "
                         "of one reused buffer per thread")
    ap.add_argument("--keep-file", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    name = args.name or f"calibrated-{socket.gethostname()}"
    out = Path(args.out) if args.out else CONF_DIR / "hardware" / f"{name}.yaml"
    sizes = [int(x) for x in args.sizes_kib.split(",")] if args.sizes_kib else None
    depths = [int(x) for x in args.depths.split(",")] if args.depths else None
    profile, raw = calibrate(args.dir, name, args.quick, args.file_mib, sizes, depths, args.keep_file,
                             progress=not args.no_progress, staged_mib=args.staged_mib, reader=args.reader)
    png = save_profile(profile, out, raw)
    t = np.asarray(profile.read_gbps)
    print(f"wrote {out} and {png} in {raw['seconds']:.1f} s")
    print("read KiB  " + " ".join(f"q={q:<5d}" for q in profile.depths))
    for k, row in zip(profile.read_kib, t):
        print(f"{k:8g}  " + " ".join(f"{v:7.3f}" for v in row))
    print(f"latency {profile.read_latency_us:.1f} us, sequential {profile.seq_gbps:.3f} GB/s, "
          f"memcpy {profile.mem_gbps:.1f} GB/s, matvec {profile.compute_gbps:.1f} GB/s, "
          f"h2d {profile.h2d_gbps:.1f} GB/s, io overhead {profile.io_overhead_us:.1f} us")
    print(f"read table: median of {len(raw['read_passes'])} passes; the disk's pass-to-pass spread "
          f"{raw['read_spread']:.0%} (a prediction on this profile is no steadier than that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
