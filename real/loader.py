"""Execute the policy engine's ``Reads`` against a flash directory, with many reads in flight.

The hot path: a pool of threads, each pulling the next read off a shared counter and calling
``os.preadv`` on an O_DIRECT descriptor into a 4 KiB-aligned host staging buffer (pinned on a
GPU). The kernel overlaps the reads; the GIL is released during each syscall. On a GPU the
staging bytes go to the device with a non-blocking copy on a side stream, then are unpadded and
scattered into ``[n, ffn_matrices * d_model]`` rows there; the caller's stream waits on an event,
so the host never blocks on the copy. Staging and device buffers are allocated once and used in
rotation (``slots``), never per token.

Failure rules: short reads are completed (a short O_DIRECT read that ends off-alignment is
finished through a buffered descriptor); end-of-file or an I/O error raises ``FlashIOError``
naming the file and offset; a failed batch returns nothing, so no torn or stale bytes escape."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from real.flash_dir import FlashDir
from sim.atomic import atomic_path
from sim.layout import ALIGN, Reads

# Opt-in: reads up to ``bounce_max`` bytes land in a small per-thread buffer that stays in cache and
# are then copied into staging. It helped on one virtual disk (the CPU dev VM) and hurt on the H100
# machine (loader-run1.txt, in git history at cd7dc41), so it is off by default (docs/storage.md).
BOUNCE_MAX = 0

PreadFn = Callable[[int, memoryview, int], int]   # (fd, destination, file offset) -> bytes read

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One line per process and kind of fallback, not one per file or per token."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def default_pread(fd: int, dst: memoryview, offset: int) -> int:
    return os.preadv(fd, [dst], offset)


# ---- the hot loop in C (real/native_read.c), built once per machine with the system compiler ------------
_native: dict[str, Any] = {}
_native_lock = threading.Lock()


def _require_private(path: Path) -> None:
    """ctypes runs whatever library it loads: refuse a build folder or library another user could have
    written (a shared /tmp under a guessable name could be planted)."""
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not private to this user (owner {st.st_uid}, mode {oct(st.st_mode & 0o777)})")


def _native_build_dir() -> Path:
    """A per-user folder for the compiled loop (mode 0700)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(base) / "flashlab"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        d = Path(tempfile.gettempdir()) / f"flashlab-{os.getuid()}"
        d.mkdir(exist_ok=True, mode=0o700)
    _require_private(d)
    return d


def _build_native(src: Path, cc: str) -> Path:
    """Compile ``src`` once per source version into the private build folder (written atomically)."""
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    so = _native_build_dir() / f"native-read-{tag}.so"
    if not so.exists():
        with atomic_path(so) as tmp:
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=120)
            os.chmod(tmp, 0o700)
    _require_private(so)
    return so


def native_drain():
    """``flashlab_drain`` from real/native_read.c (compiled on first use into a per-user cache folder,
    keyed by the source's hash), or None where it cannot be built: then ``native_unavailable_reason()``
    says why and the pool runs its Python loop. FLASHLAB_NATIVE_READ=0 turns it off."""
    with _native_lock:                       # one build per process, however many pools start at once
        if "fn" not in _native:
            _native.update(_load_native())
        return _native["fn"]


def _load_native() -> dict[str, Any]:
    fn = lib = why = None
    src = Path(__file__).with_name("native_read.c")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if os.environ.get("FLASHLAB_NATIVE_READ", "1") == "0":
        why = "FLASHLAB_NATIVE_READ=0"
    elif not src.exists():
        why = f"{src} is missing"
    elif cc is None:
        why = "no C compiler (cc/gcc) on PATH"
    else:
        try:
            lib = ctypes.CDLL(str(_build_native(src, cc)))   # CDLL: the GIL is released during each call
            fn = lib.flashlab_drain
            fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6
            fn.restype = ctypes.c_int
            _declare_pool(lib)
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            why = f"building {src.name} failed: {e} {detail.decode(errors='replace')[:200]}".strip()
            fn = lib = None
    if why:
        warn_once("native-read", f"the loader's C read loop is unavailable ({why}); using the Python loop")
    return {"fn": fn, "why": why, "lib": lib}


def _declare_pool(lib) -> None:
    """ctypes signatures of the native reader pool (real/native_read.c, flashlab_pool_*)."""
    vp = ctypes.c_void_p
    lib.flashlab_pool_new.argtypes, lib.flashlab_pool_new.restype = [ctypes.c_int], vp
    lib.flashlab_pool_threads.argtypes, lib.flashlab_pool_threads.restype = [vp], ctypes.c_int
    lib.flashlab_pool_submit_flag.argtypes = [vp, ctypes.c_int64] + [vp] * 6 + [ctypes.c_int32]
    lib.flashlab_pool_submit_flag.restype = vp
    lib.flashlab_pool_wait.argtypes, lib.flashlab_pool_wait.restype = [vp, vp], ctypes.c_double
    lib.flashlab_pool_close.argtypes, lib.flashlab_pool_close.restype = [vp], None


READ_THREADS = ("python", "native")


def default_read_threads() -> str:
    """FLASHLAB_READ_THREADS (python | native), default native (pthreads of real/native_read.c where
    the C loop builds, else Python threads): faster in every engine step measured on the H100
    (2026-11-23 14:58 and 15:19 UTC runs, docs/engine.md; their tables are in git history at cd7dc41)."""
    kind = os.environ.get("FLASHLAB_READ_THREADS", "native")
    if kind not in READ_THREADS:
        raise ValueError(f"FLASHLAB_READ_THREADS={kind!r}: use one of {READ_THREADS}")
    return kind


def native_unavailable_reason() -> str | None:
    native_drain()
    return _native["why"]


class FlashIOError(OSError):
    """A read from flash failed or hit end-of-file; names the file and the offset."""

    def __init__(self, path: str, offset: int, length: int, problem: str, err: int = errno.EIO):
        self.path, self.offset, self.length, self.problem = path, offset, length, problem
        super().__init__(err, f"{path}: read of {length} bytes at offset {offset} failed: {problem}")

    def __str__(self) -> str:
        return self.strerror


# ---- aligned host memory -------------------------------------------------------------------------
class HostBuffer:
    """``nbytes`` of 4 KiB-aligned host memory: pinned (page-locked, for async H2D) when ``pinned``,
    else an anonymous mmap. Exposes a torch uint8 tensor and a writable memoryview of the same bytes."""

    def __init__(self, nbytes: int, pinned: bool):
        import torch

        nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if pinned:
            self._owner = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
            off = (-self._owner.data_ptr()) % ALIGN
            self.tensor = self._owner[off:off + nbytes]
        else:
            self._owner = mmap.mmap(-1, nbytes)
            self.tensor = torch.frombuffer(self._owner, dtype=torch.uint8)
        assert self.tensor.data_ptr() % ALIGN == 0
        self.array = self.tensor.numpy()
        self.view = memoryview(self.array)
        self.nbytes = nbytes
        self.pinned = pinned


# ---- open files, O_DIRECT where the filesystem allows ---------------------------------------------
@dataclass
class FlashFile:
    path: str
    fd: int              # O_DIRECT when ``direct``, else buffered
    buffered_fd: int     # always buffered: finishes short reads that end off-alignment
    direct: bool

    def close(self) -> None:
        for fd in {self.fd, self.buffered_fd}:
            os.close(fd)


def open_flash_file(path: str | Path, direct: bool = True, probe: HostBuffer | None = None) -> FlashFile:
    """Open ``path`` for reading, with O_DIRECT if asked and the filesystem supports it (checked by
    opening and reading the first block); otherwise buffered, with a one-time warning."""
    path = str(path)
    buffered = os.open(path, os.O_RDONLY)
    if not direct:
        return FlashFile(path, buffered, buffered, False)
    if not hasattr(os, "O_DIRECT"):
        warn_once("no-odirect", "O_DIRECT does not exist on this OS: flash reads go through the page cache")
        return FlashFile(path, buffered, buffered, False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        warn_once("odirect-open", f"O_DIRECT is not supported where {path} lives ({e.strerror}): "
                  "falling back to buffered reads (page cache not bypassed)")
        return FlashFile(path, buffered, buffered, False)
    if probe is not None and os.fstat(fd).st_size >= ALIGN:
        try:
            os.preadv(fd, [probe.view[:ALIGN]], 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(fd)
            warn_once("odirect-read", f"O_DIRECT reads fail where {path} lives ({e.strerror}): "
                      "falling back to buffered reads (page cache not bypassed)")
            return FlashFile(path, buffered, buffered, False)
    return FlashFile(path, fd, buffered, True)


# ---- the thread pool -----------------------------------------------------------------------------
class ReadJob:
    """One submitted batch of reads; ``ReadPool.wait`` returns when all are in ``dest``."""

    __slots__ = ("files", "dest", "file_idx", "fds", "dst_off", "offset", "length", "n", "claim", "finished",
                 "done", "errors", "t_submit", "t_done", "native", "cjob", "completed_late")

    def __init__(self, files, dest, file_idx, dst_off, offset, length, native: bool = False):
        self.files, self.dest = files, dest
        self.n = len(offset)
        self.native = None
        self.cjob = None                    # the native pool's job (ReadPool(threads="native"))
        self.completed_late = False         # short or failed reads were completed after the C loop ended
        if native and self.n:
            # arrays for real/native_read.c: fd, destination address, offset, length, result, counters
            fidx = np.asarray(file_idx, dtype=np.int64)
            d = np.asarray(dst_off, dtype=np.int64)
            off = np.ascontiguousarray(offset, dtype=np.int64)
            ln = np.ascontiguousarray(length, dtype=np.int64)
            base = np.frombuffer(dest, dtype=np.uint8)
            if not base.flags.writeable:
                raise TypeError("the destination buffer is read-only: the reads need a writable buffer")
            if d.min() < 0 or int((d + ln).max()) > base.size:
                raise ValueError(f"reads end past the destination buffer ({base.size} bytes)")
            fd = np.array([f.fd for f in files], dtype=np.int64)[fidx]
            self.native = (fd, base.ctypes.data + d, off, ln, np.zeros(self.n, np.int64), np.zeros(2, np.int64))
            self.file_idx, self.dst_off, self.offset, self.length, self.fds = fidx, d, off, ln, fd
        else:
            self.file_idx = file_idx = list(file_idx) if not isinstance(file_idx, list) else file_idx
            fd_of = [f.fd for f in files]
            self.fds = [fd_of[k] for k in file_idx]
            self.dst_off, self.offset, self.length = (x.tolist() if isinstance(x, np.ndarray) else x
                                                      for x in (dst_off, offset, length))
        self.claim = itertools.count()      # next(claim): the index a thread reads next (atomic under the GIL)
        self.finished = itertools.count(1)  # next(finished) == n: this thread completed the last read
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.t_submit = time.perf_counter()
        self.t_done = self.t_submit
        if self.n == 0:
            self.done.set()


class ReadPool:
    """Keeps up to ``depth`` reads in flight: ``depth - 1`` persistent workers, plus the thread that
    waits on a job, all claiming read indices from the oldest unfinished job through a shared counter
    (no per-read task objects, no barrier between jobs: the next job's reads start as soon as a
    thread runs out of the previous one's, so back-to-back jobs keep the device busy)."""

    def __init__(self, depth: int, pread: PreadFn | None = None, bounce_max: int = 0, native: bool | None = None,
                 threads: str | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        asked = threads
        threads = threads or default_read_threads()
        if threads not in READ_THREADS:
            raise ValueError(f"threads must be one of {READ_THREADS}, got {threads!r}")
        self.depth = depth
        self.pread = pread or default_pread
        self.bounce_max = bounce_max     # reads up to this size land in a per-thread buffer, then memmove
        # the C loop (real/native_read.c) where it builds, unless a custom pread or bounce buffers are asked
        # for (those are Python); native=False forces the Python loop, True demands the C one
        plain = pread is None and not bounce_max
        self._drain = native_drain() if (native is None and plain) or native else None
        if native and (self._drain is None or not plain):
            self._c_loop_missing("native reads")
        self._tls = threading.local()
        self._cond = threading.Condition()
        self._queue: deque[ReadJob] = deque()
        self._closed = False
        # threads="native": `depth` pthreads of real/native_read.c claim and read every batch; Python only
        # submits and waits (one call each, the GIL released while waiting), so no wake-up storm per batch
        self._lib = self._cpool = None
        self._c_pending: set[ReadJob] = set()
        if threads == "native" and asked is None and self._drain is None:
            threads = "python"       # the environment's default; custom preads / no C loop: Python threads
        if threads == "native":
            if self._drain is None:
                self._c_loop_missing("native reader threads (threads='native')")
            self._lib = _native["lib"]
            self._cpool = self._lib.flashlab_pool_new(depth)
            if not self._cpool:
                raise RuntimeError(f"could not start {depth} native reader threads")
        self.threads = threads
        self._workers = [threading.Thread(target=self._worker, daemon=True, name=f"flash-read-{i}")
                         for i in range(0 if self._cpool else depth - 1)]
        for t in self._workers:
            t.start()

    @staticmethod
    def _c_loop_missing(what: str) -> None:
        raise RuntimeError(f"{what} need the C read loop (" + (native_unavailable_reason() or
                           "a custom pread or bounce_max is set") + ")")

    def submit(self, files: Sequence[FlashFile], dest: memoryview, file_idx: list[int], dst_off: list[int],
               offset: list[int], length: list[int], flag: tuple[int, int] | None = None) -> ReadJob:
        """Queue reads of ``length[i]`` bytes at ``offset[i]`` of ``files[file_idx[i]]`` into
        ``dest[dst_off[i]:]``; returns at once. ``flag`` = (address of an int32, value): native threads
        store the value there once every read has returned (a GPU kernel may poll it; short or failed
        reads are completed or raised later, by ``wait``: then ``job.completed_late`` is set)."""
        if flag is not None and not self._cpool:
            raise ValueError("flag: only the native reader threads set a completion flag")
        job = ReadJob(files, dest, file_idx, dst_off, offset, length, native=self._drain is not None)
        if flag is not None and not job.n:
            ctypes.c_int32.from_address(flag[0]).value = flag[1]
        if job.n and self._cpool:
            fd, addr, off, ln, res, _ = job.native
            job.cjob = self._lib.flashlab_pool_submit_flag(
                self._cpool, job.n, fd.ctypes.data, addr.ctypes.data, off.ctypes.data, ln.ctypes.data,
                res.ctypes.data, flag[0] if flag else None, flag[1] if flag else 0)
            if not job.cjob:
                raise MemoryError("the native reader pool could not queue a batch")
            self._c_pending.add(job)
        elif job.n:
            with self._cond:
                self._queue.append(job)
                self._cond.notify(min(job.n, len(self._workers)))
        return job

    def wait(self, job: ReadJob) -> None:
        """Help with the job's reads, then block until all are done; raise its first error.
        (Native threads: block in C, the GIL released, then complete any short or failed reads.)"""
        if job.cjob is not None:
            self._wait_c(job)
            self._complete_native(job)
        if not job.done.is_set():
            self._work(job)
            job.done.wait()
        if job.errors:
            raise job.errors[0]

    def run(self, *args) -> None:
        """submit + wait: one synchronous batch."""
        self.wait(self.submit(*args))

    def _worker(self) -> None:
        cond, queue = self._cond, self._queue
        while True:
            with cond:
                while not queue and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                job = queue[0]
            if not self._work(job):
                with cond:
                    if queue and queue[0] is job:
                        queue.popleft()

    def _bounce(self, want: int) -> tuple[memoryview, int]:
        """This thread's small aligned buffer (reused, so it stays in cache) and its address."""
        tls = self._tls
        buf = getattr(tls, "buf", None)
        if buf is None or buf.nbytes < want:
            tls.mm = mmap.mmap(-1, max(want, self.bounce_max))
            tls.buf = buf = memoryview(tls.mm)
            tls.addr = ctypes.addressof(ctypes.c_char.from_buffer(tls.mm))
        return buf, tls.addr

    def _wait_c(self, job: ReadJob) -> None:
        """Block (in C, the GIL released) until the native pool finished every read of ``job``."""
        job.t_done = self._lib.flashlab_pool_wait(self._cpool, job.cjob)   # CLOCK_MONOTONIC = perf_counter
        job.cjob = None
        self._c_pending.discard(job)

    @property
    def native(self) -> bool:
        return self._drain is not None

    def _work_native(self, job: ReadJob) -> bool:
        """Claim and read in C (the GIL released throughout); the thread that finished the last read
        completes any short or failed reads here, by the Python rules, then marks the job done."""
        fd, addr, off, ln, res, ctr = job.native
        if self._drain(job.n, fd.ctypes.data, addr.ctypes.data, off.ctypes.data, ln.ctypes.data,
                       res.ctypes.data, ctr.ctypes.data):
            job.t_done = time.perf_counter()
            self._complete_native(job)
        return False

    def _complete_native(self, job: ReadJob) -> None:
        """After the C loop read every entry: complete short or failed reads by the Python rules, then
        mark the job done (its first error is raised by ``wait``)."""
        fd, _, off, ln, res, _ = job.native
        bad = np.flatnonzero(res != ln).tolist()
        for i in bad:
            r = int(res[i])
            try:
                self._finish_read(job.files[int(job.file_idx[i])], int(fd[i]), job.dest, int(job.dst_off[i]),
                                  int(off[i]), int(ln[i]), max(r, 0), OSError(-r, os.strerror(-r)) if r < 0 else None)
            except BaseException as e:  # noqa: BLE001 -- re-raised by wait() in the caller's thread
                job.errors.append(e)
                break
        if bad:
            job.t_done = time.perf_counter()
            job.completed_late = True
        job.done.set()

    def _work(self, job: ReadJob) -> bool:
        """The hot loop: one preadv per read; anything unusual goes to ``_finish_read``.
        Returns False once the job has no reads left to claim."""
        if job.native is not None:
            return self._work_native(job)
        files, dest, file_idx, fds = job.files, job.dest, job.file_idx, job.fds
        dst_off, offset, length, n = job.dst_off, job.offset, job.length, job.n
        claim, finished, errors = job.claim, job.finished, job.errors
        custom, pread, preadv = self.pread is not default_pread, self.pread, os.preadv
        bounce_max = self.bounce_max
        dest_addr = ctypes.addressof(ctypes.c_char.from_buffer(dest)) if bounce_max else 0
        memmove = ctypes.memmove
        while True:
            i = next(claim)
            if i >= n:
                return False
            if not errors:
                d, want = dst_off[i], length[i]
                try:
                    bounce = want <= bounce_max
                    if bounce:
                        buf, addr = self._bounce(want)
                        target = buf[:want]
                    else:
                        target = dest[d:d + want]
                    try:
                        r = pread(fds[i], target, offset[i]) if custom else preadv(fds[i], (target,), offset[i])
                    except OSError as e:
                        self._finish_read(files[file_idx[i]], fds[i], dest, d, offset[i], want, 0, e)
                    else:
                        if bounce and r > 0:
                            memmove(dest_addr + d, addr, min(r, want))   # releases the GIL
                        if r != want:
                            self._finish_read(files[file_idx[i]], fds[i], dest, d, offset[i], want, r, None)
                except BaseException as e:  # noqa: BLE001 -- re-raised by wait() in the caller's thread
                    errors.append(e)
            if next(finished) == n:
                job.t_done = time.perf_counter()
                job.done.set()

    def _finish_read(self, f: FlashFile, fd: int, dest: memoryview, d: int, off: int, want: int, got: int,
                     err: OSError | None) -> None:
        """Complete a read after a short count or an error: continue short reads (through the
        buffered fd when the remainder is off-alignment), fall back from O_DIRECT on EINVAL, and
        raise FlashIOError on any other error or on end-of-file."""
        while True:
            if err is not None:
                if err.errno == errno.EINVAL and fd != f.buffered_fd:
                    warn_once("odirect-einval", f"O_DIRECT read of {f.path} failed with EINVAL: "
                              "falling back to buffered reads for it (page cache not bypassed)")
                    fd = f.fd = f.buffered_fd
                    f.direct = False
                else:
                    raise FlashIOError(f.path, off + got, want - got, err.strerror or str(err),
                                       err.errno or errno.EIO) from err
            else:
                if got < 0 or got > want:
                    raise FlashIOError(f.path, off, want, f"read returned {got} bytes")
                if got == want:
                    return
                if got % ALIGN and fd != f.buffered_fd:
                    fd = f.buffered_fd   # an O_DIRECT continuation off-alignment would fail with EINVAL
            try:
                r = self.pread(fd, dest[d + got:d + want], off + got)
                err = None
            except OSError as e:
                err = e
                continue
            if r == 0:
                raise FlashIOError(f.path, off + got, want - got,
                                   "unexpected end of file (truncated? run python -m real.convert --verify-only)")
            got += r

    def close(self) -> None:
        if self._cpool:
            for job in list(self._c_pending):       # reads still write into their buffers: finish them first
                self._wait_c(job)
            self._lib.flashlab_pool_close(self._cpool)
            self._cpool = None
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._workers:
            t.join(timeout=1)


def io_uring_unavailable_reason() -> str | None:
    """Why the io_uring backend cannot be used here (None if it could).

    The maintained PyPI binding (``liburing``) is tried: it must import, set up a ring, and accept a
    4 KiB-aligned buffer for an O_DIRECT read."""
    try:
        import liburing
    except ImportError:
        return "the liburing package is not installed"
    ring = liburing.Ring()
    try:
        liburing.io_uring_queue_init(8, ring)
    except OSError as e:
        return f"the kernel refuses io_uring ({e.strerror})"
    try:
        sqe = liburing.io_uring_get_sqe(ring)
        buf = memoryview(mmap.mmap(-1, ALIGN))
        try:
            liburing.io_uring_prep_read(sqe, 0, buf, 0)
        except TypeError:
            return "liburing's read accepts only bytearray buffers, which cannot be 4 KiB-aligned for O_DIRECT"
        liburing.io_uring_prep_nop(sqe)
        liburing.io_uring_submit(ring)
        return None
    finally:
        liburing.io_uring_queue_exit(ring)


# ---- the engine-facing loader ----------------------------------------------------------------------
@dataclass
class LoaderStats:
    io_seconds: float = 0.0       # wall time with reads in flight (submit to last byte in staging;
                                  # overlapping loads counted once)
    map_seconds: float = 0.0      # host time to issue H2D copy + unpad/scatter (not the GPU's time)
    bytes: int = 0
    reads: int = 0
    batches: int = 0

    @property
    def io_gbps(self) -> float:
        return self.bytes / self.io_seconds / 1e9 if self.io_seconds > 0 else 0.0


@dataclass
class _Slot:
    staging: HostBuffer
    raw: Any                 # device uint8 buffer (the staging tensor itself on CPU)
    out: Any                 # [d_ff, ffn_matrices * d_model] in the model dtype
    event: Any = None        # CUDA event: this slot's copy and scatter are done
    pending: bool = False    # reads submitted, not yet waited for
    stage_rec: Any = None    # staging as [records, record_bytes] uint8 (views made once: each view op
    raw_rec: Any = None      #   costs host time on the engine's critical path after the reads)
    rec_rows: Any = None     # raw_rec as model-dtype rows (bundled layout: a record is a neuron's row)
    flags: Any = None        # pinned int32 [1] per chunk (views of one [copy_chunks] tensor, made once): the native
                             #   reader threads store the load's gate value in flags[i] when chunk i's reads are done
    gate_value: int = 0      # the last value handed out for this slot (values only grow)


@dataclass
class PendingLoad:
    """A submitted load (``FlashLoader.submit``); pass it to ``FlashLoader.wait``."""

    layer: int
    slot: int
    jobs: list              # ReadJob per chunk of the reads, in submission order
    bounds: list            # staging byte offset where each chunk starts, and the total at the end
    n: int
    nbytes: int
    n_reads: int
    rec_group: np.ndarray
    hit: np.ndarray
    out_row: np.ndarray
    identity: bool
    out: Any
    copied: int = 0         # chunks whose device copy is queued (``wait_reads``, or ``queue_copy`` when gated)
    gate_value: int = 0     # > 0: the reader threads set chunk i's flag element of the slot to this when the
                            #   chunk's reads are done
    queued: bool = False    # the device copies were queued behind waits on those flags (``queue_copy``)
    refetched: bool = False  # queued, but some reads were completed late: copied again by ``wait``

    @property
    def t_submit(self) -> float:
        return self.jobs[0].t_submit

    @property
    def t_done(self) -> float:
        """When the last read of the load finished (chunks may finish out of order)."""
        return max(j.t_done for j in self.jobs)


def chunk_bounds(length: np.ndarray, chunks: int) -> list[int]:
    """Read indices splitting a batch into ``chunks`` submission chunks of decreasing size: chunk i
    ends at byte share 1 - 4^-(i+1) (2 chunks: 75% / 25%; 3: 75% / 19% / 6%), so the device copy of
    every chunk but a small last one overlaps the reads still in flight. Empty chunks are dropped."""
    n = int(length.size)
    if chunks <= 1 or n < 2 * chunks:
        return [0, n]
    cum = np.cumsum(length)
    cuts = [int(np.searchsorted(cum, (1 - 4.0 ** -(i + 1)) * cum[-1], side="left")) + 1 for i in range(chunks - 1)]
    out = [0]
    for c in cuts:
        if out[-1] < c < n:
            out.append(c)
    return out + [n]


class FlashLoader:
    """Loads neurons of one layer from a flash directory into ``[n, ffn_matrices * d_model]`` rows.

    >>> loader = FlashLoader("flash/opt-6.7b", device="cuda", depth=32)
    >>> rows = loader.load(plan.layer, plan.reads, plan.load)   # rows[i] = neuron plan.load[i]

    Each row is the neuron's bundle: [gate column,] up column, down row (the same for both layouts;
    unbundled reads are gathered per matrix). The returned tensor lives in a reused buffer: it is
    valid until ``slots`` further ``load`` calls; copy what you keep into the neuron cache."""

    def __init__(self, flash: FlashDir | str | Path, device: str = "cpu", depth: int = 32,
                 max_batch_bytes: int | None = None, direct: bool = True, slots: int = 2,
                 pread: PreadFn | None = None, backend: str = "threads",
                 bounce_max: int = BOUNCE_MAX, side_stream: bool = True, native: bool | None = None,
                 read_threads: str | None = None, copy_chunks: int = 1):
        import torch

        if copy_chunks < 1:
            raise ValueError(f"copy_chunks must be >= 1, got {copy_chunks}")
        # copy_chunks > 1: a batch goes to the pool as that many jobs (``chunk_bounds``) and ``wait_reads``
        # queues each finished chunk's device copy while the later chunks' reads are still in flight (gated
        # loads: ``queue_copy`` queues them all at once, each behind a device wait on its chunk's flag)
        self.copy_chunks = copy_chunks

        self.flash = flash if isinstance(flash, FlashDir) else FlashDir.open(flash)
        self.spec, self.layout = self.flash.spec, self.flash.layout
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if backend not in ("threads", "io_uring", "auto"):
            raise ValueError(f"backend must be threads, io_uring or auto, got {backend!r}")
        if backend != "threads":
            why = io_uring_unavailable_reason()
            if why:
                warn_once("io_uring", f"io_uring backend unavailable ({why}); using the thread pool")
            # the only PyPI binding cannot read into aligned/pinned memory, so no io_uring path exists yet
        self.dtype = getattr(torch, self.spec.dtype)
        cap = max_batch_bytes or self.spec.d_ff * self.layout.bytes_per_neuron
        self.capacity = -(-cap // ALIGN) * ALIGN
        self.slots = []
        for _ in range(max(1, slots)):
            staging = HostBuffer(self.capacity, pinned=self.cuda)
            raw = torch.empty(self.capacity, dtype=torch.uint8, device=self.device) if self.cuda else staging.tensor
            out = torch.empty(self.spec.d_ff, self.spec.ffn_matrices * self.spec.d_model, dtype=self.dtype,
                              device=self.device)
            slot = _Slot(staging, raw, out, torch.cuda.Event() if self.cuda else None)
            rec = self.layout.record_bytes
            n_rec = self.capacity // rec
            slot.stage_rec = staging.tensor[: n_rec * rec].view(n_rec, rec)
            slot.raw_rec = raw[: n_rec * rec].view(n_rec, rec)
            if self.layout.bundled and rec == self.spec.neuron_bytes:
                slot.rec_rows = slot.raw_rec.view(self.dtype)
            if self.cuda:
                flag = torch.zeros(copy_chunks, dtype=torch.int32, pin_memory=True)
                slot.flags = [flag[i:i + 1] for i in range(copy_chunks)]
            self.slots.append(slot)
        self.gate_timed_out = torch.zeros(1, dtype=torch.int32, device=self.device) if self.cuda else None
        self._launch_wait = None         # real.kernels.wait_flag.launch_wait, checked at the first gated load
        self._slot = 0
        # side_stream=False: copy and unpad on the caller's stream (fewer host calls per load; for callers
        # whose next work needs the rows anyway, like the engine)
        self.stream = torch.cuda.Stream(self.device) if self.cuda and side_stream else None
        # native: None = the C loop where it builds; read_threads: python | native (default: FLASHLAB_READ_THREADS)
        self.pool = ReadPool(depth, pread, bounce_max, native, threads=read_threads)   # before any file is open
        self.files = []
        try:
            for path in self.flash.ffn_paths:
                self.files.append(open_flash_file(path, direct, self.slots[0].staging))
        except BaseException:
            for f in self.files:
                f.close()
            self.pool.close()
            raise
        self.direct = all(f.direct for f in self.files)
        self.stats = LoaderStats()
        self._io_until = 0.0

    # -- the engine's calls --
    def load(self, layer: int, reads: Reads, neurons: np.ndarray | None = None, out: Any = None) -> Any:
        """Read ``reads`` (of ``layer``) and return the neurons' rows, in ``neurons`` order.

        ``neurons`` defaults to the order in which the reads cover them. Every neuron in
        ``neurons`` must be covered by the reads (for each matrix); extra records are dropped.
        ``out`` (optional, ``[n, ffn_matrices * d_model]``) receives the rows instead of a slot buffer."""
        return self.wait(self.submit(layer, reads, neurons, out))

    def can_gate(self) -> bool:
        """Whether ``submit(gate=True)`` loads can be queued on the device before their reads end: a GPU,
        the native reader threads (they set the flags), copies on the caller's stream, and triton (the
        device wait is a Triton kernel)."""
        from real.kernels._launch import triton
        return self.cuda and self.pool.threads == "native" and self.stream is None and triton is not None

    def submit(self, layer: int, reads: Reads, neurons: np.ndarray | None = None, out: Any = None,
               gate: bool = False) -> "PendingLoad":
        """Start the reads and return at once; ``wait`` gives the rows. Up to ``slots`` loads may be
        pending, so the reads of the next layer can start while this one is consumed. ``gate`` (where
        ``can_gate()``): the reader threads raise a flag of the slot when a chunk's reads are done, so that
        ``queue_copy`` can put the copies (and what follows) on the device at once."""
        lay, spec = self.layout, self.spec
        fpl = lay.files_per_layer
        file = np.asarray(reads.file, dtype=np.int64)
        if file.size and np.any(file // fpl != layer):
            raise ValueError(f"reads name files of layers {sorted(set((file // fpl).tolist()))}, not layer {layer}")
        length = np.asarray(reads.length, dtype=np.int64)
        offset = np.asarray(reads.offset, dtype=np.int64)
        if np.any(offset % ALIGN) or np.any(length % lay.record_bytes):
            raise ValueError("reads must start on 4 KiB and span whole records (use sim.layout.FlashLayout)")
        total = int(length.sum())
        if total > self.capacity:
            raise ValueError(f"a batch of {total} bytes exceeds the loader's staging capacity {self.capacity}; "
                             "construct FlashLoader(max_batch_bytes=...) larger or split the reads")
        width = spec.ffn_matrices * spec.d_model
        s = self._slot
        st = self.slots[s]
        if st.pending:
            raise RuntimeError(f"all {len(self.slots)} loader slots have loads pending: wait() for one first")
        if st.event is not None:
            st.event.synchronize()   # the slot's previous H2D copy must be done before its staging is reused
        # the reads start now; the record -> row mapping below is worked out while they are in flight
        dst_off = np.cumsum(length) - length
        cut = chunk_bounds(length, self.copy_chunks)
        gate_value = 0
        if gate and self.can_gate():
            st.gate_value += 1
            gate_value = st.gate_value
        jobs: list[ReadJob] = []
        st.pending = True
        self._slot = (s + 1) % len(self.slots)
        try:
            for i, (a, b) in enumerate(zip(cut, cut[1:])):
                flag = (st.flags[i].data_ptr(), gate_value) if gate_value else None
                jobs.append(self.pool.submit(self.files, st.staging.view, file[a:b], dst_off[a:b], offset[a:b],
                                             length[a:b], flag=flag))
            bounds = [int(dst_off[a]) if a < len(length) else total for a in cut[:-1]] + [total]
            counts = length // lay.record_bytes
            rec_neuron = (np.repeat(np.asarray(reads.neuron_start, dtype=np.int64), counts)
                          + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
            rec_group = np.repeat(file % fpl, counts)
            neurons = rec_neuron[rec_group == 0] if neurons is None else np.asarray(neurons, dtype=np.int64)
            n = neurons.size
            # position of each record's neuron in ``neurons`` (-1 if not asked for)
            order = np.argsort(neurons, kind="stable")
            pos = np.minimum(np.searchsorted(neurons[order], rec_neuron), max(n - 1, 0))
            hit = (neurons[order][pos] == rec_neuron) if n else np.zeros(rec_neuron.size, dtype=bool)
            out_row = np.where(hit, order[pos] if n else 0, -1)
            for g in range(fpl):
                covered = np.zeros(n, dtype=bool)
                covered[out_row[(rec_group == g) & hit]] = True
                if not covered.all():
                    missing = neurons[~covered][:5].tolist()
                    raise ValueError(f"layer {layer}: reads do not cover neurons {missing} "
                                     f"(matrix {lay.matrices[g] if fpl > 1 else 'bundle'})")
            if out is not None and (tuple(out.shape) != (n, width) or out.dtype != self.dtype):
                raise ValueError(f"out must be [{n}, {width}] {self.dtype}, got {tuple(out.shape)} {out.dtype}")
        except BaseException:
            try:
                self._drain(jobs)
            finally:
                st.pending = False
                self._slot = s           # the refused load's slot is the next one again
            raise
        identity = lay.bundled and rec_neuron.size == n and np.array_equal(out_row, np.arange(n))
        return PendingLoad(layer, s, jobs, bounds, n, total, len(length), rec_group, hit, out_row, identity, out,
                           gate_value=gate_value)

    def gated(self, p: "PendingLoad") -> bool:
        """``p`` can be queued before its reads end: gated at submit, and rows that need no mapping."""
        return bool(p.gate_value) and p.identity and p.out is None and self.slots[p.slot].rec_rows is not None

    def queue_copy(self, p: "PendingLoad", around_last_copy: tuple | None = None) -> Any:
        """Queue on the current stream, chunk by chunk, a device wait until the chunk's reads are done
        (``real.kernels.wait_flag``) and then its copy to the device; return the rows (valid on that stream).
        So the copies of all but the last chunk run while later reads are still in flight. ``wait`` must
        still be called (it raises read errors, and copies again where short reads were completed after a
        flag was set: then ``p.refetched``). ``around_last_copy`` = (begin, end): ``end(begin())`` brackets
        the last chunk's copy, after its wait (the engine times that copy with device events)."""
        if not self.gated(p):
            raise RuntimeError("queue_copy: the load was not submitted with gate=True (or needs mapping)")
        if self._launch_wait is None:
            from real.kernels.wait_flag import check_wait_args, launch_wait
            for st in self.slots:
                for f in st.flags:
                    check_wait_args(f, self.gate_timed_out)
            self._launch_wait = launch_wait
        st = self.slots[p.slot]
        last = len(p.jobs) - 1
        for i in range(last + 1):
            self._launch_wait(st.flags[i], p.gate_value, self.gate_timed_out)
            span = around_last_copy[0]() if around_last_copy and i == last else None
            self._copy_chunk(st, p, i)
            if span is not None:
                around_last_copy[1](span)
        p.copied = last + 1
        st.event.record()
        p.queued = True
        return st.rec_rows[:p.n]

    def check_gate(self) -> None:
        """Raise if a queued wait gave up polling (its copy then read unfinished rows). Synchronises."""
        if self.gate_timed_out is not None and int(self.gate_timed_out.item()):
            raise RuntimeError("a device wait for flash reads timed out (real.kernels.wait_flag): rows were used "
                               "before their reads ended (the reads took longer than the poll limit), so outputs "
                               "and the neuron caches are invalid; start over with a new FlashFFN")

    def wait_reads(self, p: "PendingLoad") -> tuple[float, float]:
        """Wait for the load's reads, chunk by chunk, queueing each chunk's host -> device copy as soon as
        its reads are done, except the last chunk's (``wait`` queues it: the caller times that copy).
        Returns (t_submit, t_done). ``wait`` calls this itself; calling it first is optional."""
        st = self.slots[p.slot]
        try:
            for i, job in enumerate(p.jobs):
                self.pool.wait(job)      # returns at once for a job already waited for
                if p.copied == i and i < len(p.jobs) - 1:
                    self._copy_chunk(st, p, i)
                    p.copied = i + 1
        except BaseException:
            self._drain(p.jobs)
            if self.cuda:
                st.event.record()        # the next submit to this slot waits for chunk copies already queued
            st.pending = False
            raise
        return p.t_submit, p.t_done

    def _drain(self, jobs: list) -> None:
        """Wait for every job, ignoring their errors (the caller re-raises the first): no read may still
        write into a slot that is given back."""
        for job in jobs:
            try:
                self.pool.wait(job)
            except BaseException:  # noqa: BLE001
                pass

    def _copy_chunks(self, st: "_Slot", p: "PendingLoad", first: int) -> None:
        """Queue the copies of chunks ``first``.. of ``p``; afterwards all of them count as copied."""
        for i in range(first, len(p.jobs)):
            self._copy_chunk(st, p, i)
        p.copied = len(p.jobs)

    def _copy_chunk(self, st: "_Slot", p: "PendingLoad", i: int) -> None:
        """Queue the host -> device copy of chunk ``i`` of ``p``'s staging bytes (whole records)."""
        if not self.cuda:
            return
        rec = self.layout.record_bytes
        a, b = p.bounds[i] // rec, p.bounds[i + 1] // rec
        if self.stream is None:
            st.raw_rec[a:b].copy_(st.stage_rec[a:b], non_blocking=True)
            return
        import torch
        if i == 0:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))   # consumers of this slot done
        with torch.cuda.stream(self.stream):
            st.raw_rec[a:b].copy_(st.stage_rec[a:b], non_blocking=True)

    def wait(self, p: "PendingLoad") -> Any:
        """Finish a submitted load: wait for its reads, queue the H2D copy and the unpad/scatter on
        the loader's stream, and make the caller's current stream wait for them (the host does not)."""
        import torch

        lay, spec = self.layout, self.spec
        st = self.slots[p.slot]
        try:
            self.wait_reads(p)
        finally:
            st.pending = False
        t_submit, t_done = p.t_submit, p.t_done
        io_from = max(t_submit, self._io_until)              # overlapping loads are not counted twice
        self.stats.io_seconds += max(0.0, t_done - io_from)
        self._io_until = max(self._io_until, t_done)
        self.stats.bytes += p.nbytes
        self.stats.reads += p.n_reads
        self.stats.batches += 1
        t0 = time.perf_counter()
        n, out = p.n, p.out
        side = self.stream is not None
        rec = lay.record_bytes
        self._copy_chunks(st, p, p.copied)                     # the chunks wait_reads left: the last one
        if p.queued and any(j.completed_late for j in p.jobs):
            self._copy_chunks(st, p, 0)                       # the queued copy may have read the short reads
            p.refetched = True
        if p.identity and out is None and not side and st.rec_rows is not None:
            # the engine's case (bundled, unpadded records are the rows, caller's stream): no mapping
            if self.cuda and (p.refetched or not p.queued):    # queue_copy recorded it already
                st.event.record()
            self.stats.map_seconds += time.perf_counter() - t0
            return st.rec_rows[:n]
        own_out = out is None
        if own_out:
            out = st.out[:n]
        row_bytes = spec.neuron_bytes if lay.bundled else spec.d_model * spec.dtype_bytes
        k = spec.ffn_matrices * spec.d_model if lay.bundled else spec.d_model
        ctx = torch.cuda.stream(self.stream) if side else nullcontext()
        with ctx:
            recs = st.raw[:p.nbytes].view(-1, rec)[:, :row_bytes].view(self.dtype)
            if p.identity and own_out and rec == row_bytes:
                out = recs                      # records are the rows: no copy (same validity as st.out)
            elif p.identity:
                out.copy_(recs, non_blocking=True)
            else:
                for g in range(lay.files_per_layer):
                    sel = np.flatnonzero((p.rec_group == g) & p.hit)
                    src = torch.as_tensor(sel).to(self.device, non_blocking=True)
                    dst = torch.as_tensor(p.out_row[sel]).to(self.device, non_blocking=True)
                    out[:, g * k:(g + 1) * k].index_copy_(0, dst, recs.index_select(0, src))
            if self.cuda:
                st.event.record(self.stream if side else torch.cuda.current_stream(self.device))
        if side:
            torch.cuda.current_stream(self.device).wait_event(st.event)
        self.stats.map_seconds += time.perf_counter() - t0
        return out

    def reset_stats(self) -> LoaderStats:
        old, self.stats = self.stats, LoaderStats()
        return old

    def close(self) -> None:
        self.pool.close()
        for f in self.files:
            f.close()
        self.files = []

    def __enter__(self) -> "FlashLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

