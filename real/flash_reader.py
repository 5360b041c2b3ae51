"""Execute a plan's ``Reads`` against a flash directory: O_DIRECT ``preadv`` calls from a pool of
threads (one read per thread in flight, so ``threads`` = reads in flight) into an aligned staging
buffer, asynchronously, so the engine computes over resident neurons while the reads run.

This is the engine's fallback reader (``backend.loader=simple``); by default the engine uses the
storage issue's ``real.loader.FlashLoader`` (see ``real.engine.open_loads``).

Page cache: files are opened with O_DIRECT, so every read hits the device. Where the filesystem
refuses O_DIRECT (tmpfs, some overlay mounts) the reader warns once, opens buffered and drops each
file's cached pages (``posix_fadvise(DONTNEED)``) before every batch; that is cold on most
filesystems but not guaranteed."""

from __future__ import annotations

import mmap
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sim.layout import ALIGN, Reads


def aligned_buffer(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A page-aligned uint8 host buffer (anonymous mmap), usable as an O_DIRECT destination."""
    buf = mmap.mmap(-1, max(align, -(-nbytes // align) * align))
    return np.frombuffer(buf, dtype=np.uint8)[:nbytes]


class ReadBatch:
    """Handle of one submitted batch: ``wait()`` blocks until every read landed (re-raises errors)."""

    def __init__(self, futures: list[Future], nbytes: int):
        self.futures, self.nbytes = futures, nbytes

    def wait(self) -> float:
        """Block until done; returns the perf_counter time at which the last read landed."""
        return max((f.result() for f in self.futures), default=time.perf_counter())

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


class FlashReader:
    """Reads records of the files of one flash directory (indexed like ``Reads.file``)."""

    def __init__(self, paths: list[str | Path], threads: int = 32, direct: bool = True):
        self.paths = [Path(p) for p in paths]
        self.threads = max(1, int(threads))
        self.direct = False
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.paths[0], flags | os.O_DIRECT)
                probe = aligned_buffer(ALIGN)
                os.preadv(fd, [memoryview(probe)], 0)
                os.close(fd)
                self.direct = True
            except OSError as e:
                warnings.warn(f"{self.paths[0]}: O_DIRECT refused ({e}); reading buffered and dropping the page "
                              "cache before each batch (posix_fadvise DONTNEED): put the flash directory on a "
                              "filesystem that supports O_DIRECT (ext4, xfs) for cold-flash numbers", stacklevel=2)
        elif direct:
            warnings.warn("this OS has no O_DIRECT: reads may be served from the page cache", stacklevel=2)
        self.fds = [os.open(p, flags | (os.O_DIRECT if self.direct else 0)) for p in self.paths]
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flash-read")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def drop_cache(self, files: np.ndarray | None = None) -> None:
        """Evict the files' pages from the page cache (only needed when O_DIRECT is off)."""
        ids = range(len(self.fds)) if files is None else np.unique(files)
        for i in ids:
            os.posix_fadvise(self.fds[int(i)], 0, 0, os.POSIX_FADV_DONTNEED)

    def submit(self, reads: Reads, dest: np.ndarray, dest_offset: np.ndarray) -> ReadBatch:
        """Start ``reads``; read i lands at ``dest[dest_offset[i] : dest_offset[i] + length[i]]``.

        ``dest`` must be ALIGN-aligned (``aligned_buffer``) when O_DIRECT is on."""
        n = len(reads)
        if n == 0:
            return ReadBatch([], 0)
        if not self.direct:
            self.drop_cache(reads.file)
        fds = [self.fds[int(f)] for f in reads.file]
        offs = reads.offset.tolist()
        lens = reads.length.tolist()
        dst = dest_offset.tolist()
        mv = memoryview(dest)
        # interleave reads over the workers so each keeps one read in flight until the batch is done
        k = min(self.threads, n)

        def work(j: int) -> float:
            for i in range(j, n, k):
                want, got, off, at = lens[i], 0, offs[i], dst[i]
                while got < want:
                    r = os.preadv(fds[i], [mv[at + got: at + want]], off + got)
                    if r <= 0:
                        raise OSError(f"{self.paths[int(reads.file[i])]}: short read at offset {off + got} "
                                      f"({r} bytes): the file is shorter than the layout says; re-convert it")
                    got += r
            return time.perf_counter()

        return ReadBatch([self.pool.submit(work, j) for j in range(k)], int(sum(lens)))


def open_reader(paths: list[str | Path], threads: int, direct: bool = True) -> FlashReader:
    """The engine's fallback reader."""
    return FlashReader(paths, threads=threads, direct=direct)
