"""real.loader: executes Reads exactly, completes short reads, fails loudly, never returns stale bytes."""

import ctypes
import errno
import mmap
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import real.loader as loader_mod  # noqa: E402
from real.convert import write_random_flash  # noqa: E402
from real.flash_dir import FlashDir  # noqa: E402
from real.loader import FlashIOError, FlashLoader, ReadPool, chunk_bounds, open_flash_file  # noqa: E402
from sim.layout import ALIGN  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402

# float16, d_model 1024: a bundled record is exactly 4 KiB (no padding), unbundled 2 KiB padded to 4 KiB
SPEC = ModelSpec.from_dict({**ModelSpec.preset("opt-tiny").to_dict(), "d_model": 1024, "n_heads": 8,
                            "d_ff": 512, "dtype": "float16", "n_layers": 3})


@pytest.fixture(scope="module")
def flash_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    return {lay: write_random_flash(SPEC, root / lay, lay, seed=7, resident=False, progress=False)
            for lay in ("bundled", "unbundled")}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(loader_mod, "_warned", set())


def reference_rows(flash: FlashDir, layer: int) -> torch.Tensor:
    """All neurons of ``layer`` read with plain buffered file I/O, independent of the loader."""
    lay, spec = flash.layout, flash.spec
    dt = np.float16
    parts = []
    for g in range(lay.files_per_layer):
        raw = np.fromfile(flash.ffn_paths[lay.file_index(layer, g)], dtype=np.uint8).reshape(spec.d_ff, -1)
        width = spec.neuron_bytes if lay.bundled else spec.d_model * spec.dtype_bytes
        parts.append(raw[:, :width].copy().view(dt))
    return torch.from_numpy(np.concatenate(parts, axis=1))


def poison(loader: FlashLoader) -> None:
    for st in loader.slots:
        st.staging.array[:] = 0xAB
        st.out.fill_(float("nan"))


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("chunk_kib,read_threads", [(4, "python"), (12, "python"), (64, "python"), (12, "native")])
def test_loads_match_reference_in_requested_order(flash_dirs, layout, chunk_kib, read_threads):
    if read_threads == "native":
        native_or_skip()
    flash = flash_dirs[layout]
    rng = np.random.default_rng(chunk_kib)
    with FlashLoader(flash, depth=6, read_threads=read_threads) as loader:
        assert loader.pool.threads == read_threads
        poison(loader)
        for layer in range(SPEC.n_layers):
            ref = reference_rows(flash, layer)
            ids = np.sort(rng.choice(SPEC.d_ff, 150, replace=False))
            order = rng.permutation(ids)
            reads = flash.layout.reads_for(layer, ids, chunk_kib * 1024)
            rows = loader.load(layer, reads, order)
            assert rows.shape == (150, 2 * SPEC.d_model) and rows.dtype == torch.float16
            assert torch.equal(rows, ref[order])
            assert torch.equal(loader.load(layer, reads), ref[ids])   # default: the reads' own order
        assert loader.stats.batches == 2 * SPEC.n_layers and loader.stats.io_seconds > 0
        assert loader.stats.bytes == 2 * SPEC.n_layers * 150 * flash.layout.bytes_per_neuron


@pytest.mark.parametrize("read_threads", ["python", "native"])
def test_submit_ahead_and_slot_reuse_give_no_stale_rows(flash_dirs, read_threads):
    if read_threads == "native":
        native_or_skip()
    flash = flash_dirs["bundled"]
    ref = reference_rows(flash, 2)
    with FlashLoader(flash, depth=4, slots=2, read_threads=read_threads) as loader:
        a, b = np.arange(0, 100), np.arange(300, 420)
        pa = loader.submit(2, flash.layout.reads_for(2, a, 8192), a)
        pb = loader.submit(2, flash.layout.reads_for(2, b, 8192), b)
        with pytest.raises(RuntimeError, match="slots have loads pending"):
            loader.submit(2, flash.layout.reads_for(2, a, 8192), a)
        assert torch.equal(loader.wait(pa), ref[a])
        assert torch.equal(loader.wait(pb), ref[b])
        c = np.arange(5, 40)   # smaller batch into a reused slot: nothing left over from before
        assert torch.equal(loader.load(2, flash.layout.reads_for(2, c, 4096), c), ref[c])
        out = torch.empty(len(c), 2 * SPEC.d_model, dtype=torch.float16)
        assert loader.load(2, flash.layout.reads_for(2, c, 4096), c, out=out) is out and torch.equal(out, ref[c])


def test_bad_requests_are_refused(flash_dirs):
    flash = flash_dirs["unbundled"]
    with FlashLoader(flash, depth=2, max_batch_bytes=64 * ALIGN) as loader:
        with pytest.raises(ValueError, match="not layer 0"):
            loader.load(0, flash.layout.reads_for(1, np.arange(4), 4096))
        with pytest.raises(ValueError, match="do not cover neurons"):
            loader.load(0, flash.layout.reads_for(0, np.arange(4), 4096), np.arange(5))
        # refused after its reads had started: they are drained and the slots free again
        for _ in range(3):
            assert torch.equal(loader.load(0, flash.layout.reads_for(0, np.arange(4), 4096), np.arange(4)),
                               reference_rows(flash, 0)[:4])
        with pytest.raises(ValueError, match="staging capacity"):
            loader.load(0, flash.layout.reads_for(0, np.arange(100), 4096))


def test_a_refused_load_gives_its_slot_back(flash_dirs):
    """slots=2: with one load pending, a refused one must not leave the loader thinking both are taken."""
    flash = flash_dirs["bundled"]
    ids = np.arange(8)
    with FlashLoader(flash, depth=2, slots=2) as loader:
        pending = loader.submit(0, flash.layout.reads_for(0, ids, 4096), ids)
        with pytest.raises(ValueError, match="do not cover neurons"):
            loader.submit(0, flash.layout.reads_for(0, ids, 4096), np.arange(9))
        other = np.arange(20, 30)
        assert torch.equal(loader.load(0, flash.layout.reads_for(0, other, 4096), other), reference_rows(flash, 0)[other])
        assert torch.equal(loader.wait(pending), reference_rows(flash, 0)[ids])


def test_a_failed_construction_closes_its_files(flash_dirs, monkeypatch):
    flash = flash_dirs["bundled"]
    opened, closed = [], []
    real_open = loader_mod.open_flash_file

    def tracking_open(*a, **k):
        f = real_open(*a, **k)
        opened.append(f)
        real_close = f.close
        f.close = lambda: (closed.append(f), real_close())[1]
        if len(opened) == 2:
            raise OSError(errno.EIO, "injected")
        return f

    monkeypatch.setattr(loader_mod, "open_flash_file", tracking_open)
    with pytest.raises(OSError, match="injected"):
        FlashLoader(flash, depth=2)
    assert closed == opened[:1]       # the file opened before the failure was closed again
    opened[1].close()


# ---- fault injection ------------------------------------------------------------------------------
def short_pread(seed: int):
    """A pread that delivers only part of each request (sometimes off-alignment), like a flaky fs."""
    rng, lock = random.Random(seed), threading.Lock()
    calls = [0]

    def pread(fd: int, dst: memoryview, off: int) -> int:
        tmp = memoryview(mmap.mmap(-1, max(len(dst), ALIGN)))[:len(dst)]
        got = os.preadv(fd, [tmp], off)
        with lock:
            calls[0] += 1
            cut = rng.choice([got, max(1, got // 2), rng.randint(1, max(1, got)), ALIGN if got > ALIGN else got])
        dst[:cut] = tmp[:cut]
        return cut
    pread.calls = calls
    return pread


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_short_reads_are_completed(flash_dirs, layout):
    flash = flash_dirs[layout]
    pread = short_pread(1)
    ids = np.sort(np.random.default_rng(0).choice(SPEC.d_ff, 200, replace=False))
    with FlashLoader(flash, depth=5, pread=pread) as loader:
        poison(loader)
        rows = loader.load(1, flash.layout.reads_for(1, ids, 32 * 1024), ids)
        assert torch.equal(rows, reference_rows(flash, 1)[ids])
    assert pread.calls[0] > len(flash.layout.reads_for(1, ids, 32 * 1024))   # shortness really happened


def test_chunk_bounds_cover_the_batch_in_shrinking_chunks():
    length = np.full(400, 16384)
    assert chunk_bounds(length, 1) == [0, 400]
    b = chunk_bounds(length, 3)
    assert b[0] == 0 and b[-1] == 400 and len(b) == 4 and all(x < y for x, y in zip(b, b[1:]))
    sizes = np.diff(b)
    assert sizes[0] > sizes[1] > sizes[2] and sizes[2] <= 0.1 * 400      # the exposed last chunk is small
    assert chunk_bounds(length[:3], 3) == [0, 3]                          # too few reads: one chunk
    uneven = np.array([4096] * 10 + [1 << 20])                            # one huge read at the end
    u = chunk_bounds(uneven, 3)
    assert u[0] == 0 and u[-1] == 11 and all(x < y for x, y in zip(u, u[1:]))


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("read_threads", ["python", "native"])
def test_chunked_jobs_give_the_same_rows(flash_dirs, layout, read_threads):
    """copy_chunks=3: one batch as three pool jobs, waited chunk by chunk (wait_reads, then wait)."""
    if read_threads == "native":
        native_or_skip()
    flash = flash_dirs[layout]
    rng = np.random.default_rng(11)
    with FlashLoader(flash, depth=5, copy_chunks=3, read_threads=read_threads) as loader:
        poison(loader)
        for layer in range(SPEC.n_layers):
            ids = np.sort(rng.choice(SPEC.d_ff, 200, replace=False))
            order = rng.permutation(ids)
            reads = flash.layout.reads_for(layer, ids, 8192)
            p = loader.submit(layer, reads, order)
            assert len(p.jobs) == 3 and p.bounds[0] == 0 and p.bounds[-1] == p.nbytes
            # each chunk starts where its first read lands in staging, on a record boundary
            starts = np.cumsum(reads.length) - reads.length
            cuts = np.cumsum([0] + [job.n for job in p.jobs])[:-1]
            assert list(p.bounds[:-1]) == [int(starts[c]) for c in cuts]
            assert all(b % flash.layout.record_bytes == 0 for b in p.bounds)
            t_submit, t_done = loader.wait_reads(p)
            assert t_done >= t_submit and p.copied == 2      # the last chunk is left to wait()
            assert torch.equal(loader.wait(p), reference_rows(flash, layer)[order])
            assert torch.equal(loader.load(layer, flash.layout.reads_for(layer, ids, 8192), ids),
                               reference_rows(flash, layer)[ids])   # wait() alone does every step


def test_a_refused_chunked_load_drains_every_chunk(flash_dirs):
    """A load refused at submit (a neuron not covered) whose first chunk also fails: every chunk's reads
    must have ended before the slot is handed back, and the refusal is what is raised."""
    flash = flash_dirs["bundled"]
    rec = flash.layout.record_bytes

    def pread(fd, dst, off):
        if off == 0:
            raise OSError(errno.EIO, "Input/output error")      # chunk 0 fails
        if off >= 60 * rec:
            time.sleep(0.2)                                      # the last chunk is slow
        return os.preadv(fd, [dst], off)

    ids = np.arange(64)
    with FlashLoader(flash, depth=2, pread=pread, copy_chunks=3) as loader:
        jobs, submit = [], loader.pool.submit
        loader.pool.submit = lambda *a, **k: jobs.append(submit(*a, **k)) or jobs[-1]
        with pytest.raises(ValueError, match="do not cover"):
            loader.submit(0, flash.layout.reads_for(0, ids, 4096), np.arange(65))   # neuron 64 is not read
        assert len(jobs) == 3
        assert all(j.done.is_set() for j in jobs), "slot handed back while reads still write into it"


def test_native_threads_set_the_completion_flag(tmp_path):
    native_or_skip()
    path, f = data_file(tmp_path, 64)
    flag = np.zeros(1, dtype=np.int32)
    dest = loader_mod.HostBuffer(64 * ALIGN, pinned=False)
    pool = ReadPool(4, threads="native")
    try:
        job = pool.submit([f], dest.view, [0] * 64, np.arange(64) * ALIGN, np.arange(64) * ALIGN, [ALIGN] * 64,
                          flag=(flag.ctypes.data, 7))
        pool.wait(job)
        assert flag[0] == 7 and bytes(dest.view) == path.read_bytes()
        pool.wait(pool.submit([f], dest.view, [], [], [], [], flag=(flag.ctypes.data, 8)))   # empty batch too
        assert flag[0] == 8
    finally:
        pool.close()
        f.close()
    py = ReadPool(2, threads="python")
    try:
        with pytest.raises(ValueError, match="only the native reader threads"):
            py.submit([f], dest.view, [0], [0], [0], [ALIGN], flag=(flag.ctypes.data, 9))
    finally:
        py.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_wait_holds_the_stream_until_the_flag_is_set():
    from real.kernels.wait_flag import wait_flag
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    src = torch.zeros(1 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    timed_out = torch.zeros(1, dtype=torch.int32, device="cuda")

    def later():
        time.sleep(0.05)
        src.fill_(42)                      # the "reads" land, then the flag goes up
        ctypes.c_int32.from_address(flag.data_ptr()).value = 1

    t = threading.Thread(target=later)
    wait_flag(flag, 1, timed_out)
    dst.copy_(src, non_blocking=True)      # queued behind the wait: must see the bytes written later
    t.start()
    torch.cuda.synchronize()
    t.join()
    assert int(timed_out.item()) == 0 and bool((dst == 42).all())
    wait_flag(flag, 5, timed_out, max_polls=100)                  # never set: gives up, says so
    wait_flag(flag, 1, timed_out)                                 # a later good wait does not clear it
    torch.cuda.synchronize()
    assert int(timed_out.item()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("copy_chunks", [1, 3])
def test_gated_loads_give_the_same_rows(flash_dirs, copy_chunks):
    native_or_skip()
    flash = flash_dirs["bundled"]
    rng = np.random.default_rng(9)
    with FlashLoader(flash, device="cuda", depth=8, side_stream=False, read_threads="native",
                     copy_chunks=copy_chunks) as loader:
        assert loader.can_gate()
        for layer in (0, 1, 2, 0, 1):
            ids = np.sort(rng.choice(SPEC.d_ff, 300, replace=False))
            p = loader.submit(layer, flash.layout.reads_for(layer, ids, 8192), ids, gate=True)
            assert loader.gated(p) and len(p.jobs) == copy_chunks
            rows = loader.queue_copy(p)           # queued before the host waited for anything
            again = loader.wait(p)
            torch.cuda.synchronize()
            assert again.data_ptr() == rows.data_ptr() and not p.refetched
            assert torch.equal(rows.cpu(), reference_rows(flash, layer)[ids])
        loader.check_gate()


@pytest.mark.parametrize("copy_chunks", [1, 3])
def test_eio_names_file_and_offset_then_loader_recovers(flash_dirs, copy_chunks):
    flash = flash_dirs["bundled"]
    bad_offset = 37 * flash.layout.record_bytes
    armed = [True]

    def pread(fd, dst, off):
        if armed[0] and off <= bad_offset < off + len(dst):
            raise OSError(errno.EIO, "Input/output error")
        return os.preadv(fd, [dst], off)

    ids = np.arange(0, 64)
    reads = flash.layout.reads_for(2, ids, 16 * 1024)
    with FlashLoader(flash, depth=4, pread=pread, copy_chunks=copy_chunks) as loader:
        with pytest.raises(FlashIOError) as info:
            loader.load(2, reads, ids)
        e = info.value
        assert e.errno == errno.EIO and e.path.endswith("layer002.ffn.bin")
        assert "layer002.ffn.bin" in str(e) and f"at offset {36 * flash.layout.record_bytes}" in str(e)
        armed[0] = False       # the fault clears: the next load is whole and correct
        assert torch.equal(loader.load(2, reads, ids), reference_rows(flash, 2)[ids])


def test_truncated_file_is_an_error_not_stale_data(tmp_path):
    flash = write_random_flash(SPEC, tmp_path / "f", "bundled", seed=1, resident=False, progress=False)
    with FlashLoader(flash, depth=3) as loader:
        poison(loader)
        os.truncate(flash.ffn_paths[0], 100 * flash.layout.record_bytes)    # behind the loader's back
        with pytest.raises(FlashIOError, match=r"layer000\.ffn\.bin: read of \d+ bytes at offset \d+ .*end of file"):
            loader.load(0, flash.layout.reads_for(0, np.arange(90, 140), 64 * 1024))


def test_pool_raises_for_any_exception_in_a_worker(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(64 * ALIGN))
    f = open_flash_file(path)

    armed = [True]

    def pread(fd, dst, off):
        if armed[0] and off == 40 * ALIGN:
            raise RuntimeError("boom")
        return os.preadv(fd, [dst], off)

    pool = ReadPool(8, pread)
    buf = memoryview(mmap.mmap(-1, 64 * ALIGN))
    offs = [i * ALIGN for i in range(64)]
    with pytest.raises(RuntimeError, match="boom"):
        pool.run([f], buf, [0] * 64, offs, offs, [ALIGN] * 64)
    armed[0] = False
    buf[:] = b"\0" * len(buf)
    pool.run([f], buf, [0] * 64, offs, offs, [ALIGN] * 64)   # still usable, every byte delivered
    assert bytes(buf) == path.read_bytes()
    pool.close()
    f.close()


# ---- O_DIRECT fallback ------------------------------------------------------------------------------
def test_odirect_unsupported_falls_back_once_with_a_warning(flash_dirs, monkeypatch):
    flash = flash_dirs["bundled"]
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.warns(RuntimeWarning, match="falling back to buffered") as rec:
        loader = FlashLoader(flash, depth=2)
    assert len([w for w in rec if "buffered" in str(w.message)]) == 1       # once, not per file
    assert not loader.direct
    ids = np.arange(10, 50)
    assert torch.equal(loader.load(0, flash.layout.reads_for(0, ids, 8192), ids), reference_rows(flash, 0)[ids])
    loader.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_tmpfs_loads_with_or_without_odirect(tmp_path):
    """tmpfs lacked O_DIRECT before Linux 6.6: then the loader must say so; either way rows are right."""
    import tempfile
    import warnings
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        flash = write_random_flash(SPEC, Path(shm) / "f", "unbundled", seed=2, resident=False, progress=False)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            loader = FlashLoader(flash, depth=2)
        assert loader.direct or any("O_DIRECT" in str(w.message) for w in rec)
        ids = np.arange(0, 512, 5)
        assert torch.equal(loader.load(1, flash.layout.reads_for(1, ids, 4096), ids), reference_rows(flash, 1)[ids])
        loader.close()


def test_einval_at_read_time_switches_to_buffered(flash_dirs):
    flash = flash_dirs["unbundled"]
    direct_fds = set()

    def pread(fd, dst, off):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.preadv(fd, [dst], off)

    loader = FlashLoader(flash, depth=3, pread=pread)
    direct_fds.update(f.fd for f in loader.files if f.direct)
    ids = np.arange(100, 180)
    with pytest.warns(RuntimeWarning, match="EINVAL"):
        rows = loader.load(2, flash.layout.reads_for(2, ids, 16384), ids)
    assert torch.equal(rows, reference_rows(flash, 2)[ids])
    loader.close()


def test_io_uring_backend_reports_why_it_is_skipped(flash_dirs):
    why = loader_mod.io_uring_unavailable_reason()
    if why is None:
        pytest.skip("io_uring usable here")
    with pytest.warns(RuntimeWarning, match="io_uring backend unavailable"):
        FlashLoader(flash_dirs["bundled"], depth=2, backend="auto").close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("copy_chunks,side_stream", [(1, True), (3, True), (1, False), (3, False)])
def test_cuda_rows_match(flash_dirs, layout, copy_chunks, side_stream):
    flash = flash_dirs[layout]
    rng = np.random.default_rng(3)
    with FlashLoader(flash, device="cuda", depth=8, copy_chunks=copy_chunks, side_stream=side_stream) as loader:
        for layer in (0, 1, 2, 0):          # slots reused: nothing stale
            ids = np.sort(rng.permutation(SPEC.d_ff)[:300])
            want = ids if layout == "bundled" else rng.permutation(ids)   # bundled: the engine's fast path
            rows = loader.load(layer, flash.layout.reads_for(layer, ids, 8192), want)
            torch.cuda.synchronize()
            assert rows.is_cuda and torch.equal(rows.cpu(), reference_rows(flash, layer)[want])


# ---- the C read loop (real/native_read.c) ---------------------------------------------------------------
def data_file(tmp_path, blocks: int, tail: bytes = b"", direct: bool = True):
    """A file of ``blocks`` random 4 KiB blocks (+ ``tail``) and its opened FlashFile."""
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(blocks * ALIGN) + tail)
    return path, open_flash_file(path, direct=direct)


def expected_bytes(data: bytes, src, length) -> bytes:
    """What reads of ``length[i]`` bytes at ``src[i]`` put back to back."""
    return b"".join(data[a:a + n] for a, n in zip(np.asarray(src).tolist(), np.asarray(length).tolist()))


def native_or_skip():
    if loader_mod.native_drain() is None:
        pytest.skip(f"C read loop unavailable: {loader_mod.native_unavailable_reason()}")


def test_native_and_python_loops_deliver_the_same_bytes(tmp_path):
    native_or_skip()
    path, f = data_file(tmp_path, 256)
    rng = np.random.default_rng(3)
    n = 200
    src = rng.integers(0, 255, n) * ALIGN
    length = rng.integers(1, 3, n) * ALIGN
    dst = np.cumsum(length) - length
    out = {}
    for native in (True, False):
        pool = ReadPool(8, native=native)
        assert pool.native is native
        buf = memoryview(mmap.mmap(-1, int(length.sum())))
        pool.run([f], buf, np.zeros(n, np.int64), dst, src, length)
        out[native] = bytes(buf)
        pool.close()
    want = expected_bytes(path.read_bytes(), src, length)
    assert out[True] == want and out[False] == want
    f.close()


def test_native_loop_reports_end_of_file_and_refuses_overruns(tmp_path):
    native_or_skip()
    path, f = data_file(tmp_path, 8)
    pool = ReadPool(4, native=True)
    buf = memoryview(mmap.mmap(-1, 4 * ALIGN))
    with pytest.raises(FlashIOError, match="end of file"):
        pool.run([f], buf, [0, 0], [0, ALIGN], [0, 20 * ALIGN], [ALIGN, ALIGN])
    with pytest.raises(ValueError, match="past the destination"):
        pool.run([f], buf, [0], [3 * ALIGN], [0], [2 * ALIGN])
    pool.run([f], buf, [0] * 4, [0, ALIGN, 2 * ALIGN, 3 * ALIGN], [4 * ALIGN, 5 * ALIGN, 6 * ALIGN, 7 * ALIGN],
             [ALIGN] * 4)   # still usable
    assert bytes(buf) == path.read_bytes()[4 * ALIGN:]
    pool.close()
    f.close()


# ---- the native reader threads (ReadPool(threads="native")) ----------------------------------------------

def random_batches(rng, n_batches: int, n: int, file_blocks: int):
    for _ in range(n_batches):
        src = rng.integers(0, file_blocks - 2, n) * ALIGN
        length = rng.integers(1, 3, n) * ALIGN
        yield src, length, np.cumsum(length) - length


def test_native_threads_read_back_to_back_batches_exactly(tmp_path):
    """Several batches in flight at once (submitted before any wait), waited in order: every byte right,
    completion times between submit and the return of wait."""
    native_or_skip()
    path, f = data_file(tmp_path, 512)
    data = path.read_bytes()
    pool = ReadPool(5, threads="native")
    assert pool.threads == "native" and not pool._workers
    rng = np.random.default_rng(11)
    for _round in range(3):
        jobs = []
        for src, length, dst in random_batches(rng, 4, 150, 512):
            buf = memoryview(mmap.mmap(-1, int(length.sum())))
            jobs.append((pool.submit([f], buf, np.zeros(len(src), np.int64), dst, src, length), buf, src, length))
        for job, buf, src, length in jobs:
            pool.wait(job)
            assert job.t_submit <= job.t_done <= loader_mod.time.perf_counter()
            assert bytes(buf) == expected_bytes(data, src, length)
    empty = pool.submit([f], memoryview(mmap.mmap(-1, ALIGN)), [], [], [], [])
    pool.wait(empty)
    pool.close()
    f.close()


def test_native_threads_complete_short_reads_and_raise_end_of_file(tmp_path):
    native_or_skip()
    path, f = data_file(tmp_path, 6, tail=b"x" * 100, direct=False)     # the last block is short
    pool = ReadPool(3, threads="native")
    buf = memoryview(mmap.mmap(-1, 2 * ALIGN))
    with pytest.raises(FlashIOError, match="end of file"):
        pool.run([f], buf, [0, 0], [0, ALIGN], [0, 6 * ALIGN], [ALIGN, ALIGN])
    pool.run([f], buf, [0, 0], [0, ALIGN], [2 * ALIGN, 5 * ALIGN], [ALIGN, ALIGN])   # still usable
    assert bytes(buf) == path.read_bytes()[2 * ALIGN:3 * ALIGN] + path.read_bytes()[5 * ALIGN:6 * ALIGN]
    pool.close()
    f.close()


def test_native_threads_close_finishes_unwaited_batches(tmp_path):
    native_or_skip()
    path, f = data_file(tmp_path, 64)
    pool = ReadPool(2, threads="native")
    buf = memoryview(mmap.mmap(-1, 64 * ALIGN))
    n = 64
    pool.submit([f], buf, [0] * n, [i * ALIGN for i in range(n)], [i * ALIGN for i in range(n)], [ALIGN] * n)
    pool.close()                      # returns only after the queued reads landed: no write after close
    assert bytes(buf) == path.read_bytes()
    f.close()


def test_read_threads_choice_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="threads must be one of"):
        ReadPool(2, threads="green")
    monkeypatch.setenv("FLASHLAB_READ_THREADS", "fibers")
    with pytest.raises(ValueError, match="FLASHLAB_READ_THREADS"):
        ReadPool(2)
    with pytest.raises(RuntimeError, match="native"):
        ReadPool(2, threads="native", pread=loader_mod.default_pread, bounce_max=4096)


def test_reads_refuse_a_read_only_destination(tmp_path):
    native_or_skip()
    _, f = data_file(tmp_path, 4)
    pool = ReadPool(2, native=True)
    with pytest.raises(TypeError, match="read-only"):
        pool.run([f], memoryview(bytes(ALIGN)), [0], [0], [0], [ALIGN])
    pool.close()
    f.close()


def test_native_build_is_private_and_once_per_process(tmp_path, monkeypatch):
    """Threads starting pools at once get the same library; it lands in a 0700 per-user folder."""
    native_or_skip()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(loader_mod, "_native", {})
    results = []
    threads = [threading.Thread(target=lambda: results.append(loader_mod.native_drain())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results) and results[0] is not None
    built = list((tmp_path / "cache" / "flashlab").iterdir())
    assert [p.suffix for p in built] == [".so"]                  # no temp file left behind
    assert (tmp_path / "cache" / "flashlab").stat().st_mode & 0o077 == 0
    monkeypatch.setattr(loader_mod, "_native", {})
    (tmp_path / "cache" / "flashlab").chmod(0o777)              # a folder others can write to is refused
    with pytest.warns(RuntimeWarning, match="not private"):
        assert loader_mod.native_drain() is None
    assert "not private" in loader_mod.native_unavailable_reason()
