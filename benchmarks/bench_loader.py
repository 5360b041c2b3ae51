"""Loader throughput into device memory vs the raw O_DIRECT probe, same reads, same run.

    python benchmarks/bench_loader.py --dir /root/flashbench [--gb 8] [--out-dir benchmarks]

Builds (or reuses) a flash directory of random OPT-6.7B-geometry FFN weights (bundled: one record
= 16 KiB; 32 layers = 8 GiB), then for each read size (16 KiB = one record .. 1 MiB = 64 adjacent
records) and reads in flight, times:

* loader: ``real.loader.FlashLoader.load`` on layer batches of random neuron chunks (the policy
  engine's ``FlashLayout.reads_for``), rows landing in GPU memory, synchronized at the end;
* probe: the very same reads as bare ``os.preadv`` calls on O_DIRECT descriptors, ``depth``
  threads, one aligned buffer each, no staging, no mapping, no GPU;
* c_probe: ``benchmarks/probes/oprobe.c`` (pthreads + pread, no Python) at the same size and depth over
  the same files, where a C compiler is present;
* kvikio: ``kvikio.CuFile.pread`` into GPU memory from ``depth`` threads, where kvikio imports.

Page cache dropped before every measurement (and every read is O_DIRECT anyway). Each cell runs
``--pairs`` loader/probe pairs of segments, alternating which goes first, with fresh random offsets
for every segment (no read is served twice from any cache), so both see the same disk weather.
Writes results/loader.txt and results/loader.json under --out-dir."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from real.convert import convert_model, write_random_flash  # noqa: E402
from real.flash_dir import FlashDir, FlashDirError  # noqa: E402
from real.loader import FlashLoader, io_uring_unavailable_reason, native_unavailable_reason  # noqa: E402
from sim.layout import ALIGN, FlashLayout, Reads  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def check_roundtrip(device: str) -> str:
    """Bit-exact convert -> load on ``device`` for a tiny random OPT, both layouts, any order."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                    max_position_embeddings=128, word_embed_proj_dim=64, torch_dtype="float16")
    model = OPTForCausalLM(cfg).half()
    sd = model.state_dict()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for layout in ("bundled", "unbundled"):
            d = convert_model(model, Path(tmp) / layout, layout)
            with FlashLoader(d, device=device, depth=8) as loader:
                for l in range(2):
                    ref = torch.cat([sd[f"model.decoder.layers.{l}.fc1.weight"],
                                     sd[f"model.decoder.layers.{l}.fc2.weight"].t()], 1).to(device)
                    ids = np.sort(rng.choice(256, 60, replace=False))
                    order = rng.permutation(ids)
                    rows = loader.load(l, d.layout.reads_for(l, ids, 64 * KIB), order)
                    if not torch.equal(rows, ref[order]):
                        return f"FAILED ({layout}, layer {l})"
    return "ok (bit-exact, both layouts, permuted order)"


def flash_dir(root: Path, gb: float) -> FlashDir:
    spec = ModelSpec.preset("opt-6.7b")
    layers = max(1, int(round(gb * GIB / FlashLayout(spec, True).file_bytes())))
    spec = ModelSpec.from_dict({**spec.to_dict(), "n_layers": layers})
    try:
        d = FlashDir.open(root)
        if d.spec == spec and d.layout.bundled:
            return d
    except FlashDirError:
        pass
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    d = write_random_flash(spec, root, "bundled", seed=0, resident=False, progress=False)
    print(f"wrote {layers} layers ({layers * d.layout.file_bytes() / GIB:.1f} GiB) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return d


def make_batches(layout: FlashLayout, read_bytes: int, batch_bytes: int, total_bytes: int,
                 rng: np.random.Generator) -> list[tuple[int, Reads, np.ndarray]]:
    """Random layers, each with random aligned chunks of ``read_bytes`` (adjacent neurons)."""
    per = read_bytes // layout.record_bytes
    slots = layout.spec.d_ff // per
    n_chunks = max(1, min(slots, batch_bytes // read_bytes))
    batches = []
    for _ in range(max(1, total_bytes // (n_chunks * read_bytes))):
        layer = int(rng.integers(layout.spec.n_layers))
        starts = np.sort(rng.choice(slots, n_chunks, replace=False)) * per
        neurons = (starts[:, None] + np.arange(per)).reshape(-1)
        reads = layout.reads_for(layer, neurons, read_bytes)
        assert np.all(reads.length == read_bytes), "chunks must not merge"
        batches.append((layer, reads, neurons))
    return batches


def time_loader(loader: FlashLoader, batches, sync) -> float:
    """Layer after layer as an engine with one load of look-ahead would run them: the next
    layer's reads are submitted before this layer's rows are taken."""
    sync()
    t0 = time.perf_counter()
    pending = loader.submit(*batches[0])
    for nxt in batches[1:]:
        following = loader.submit(*nxt)
        loader.wait(pending)
        pending = following
    loader.wait(pending)
    sync()
    return sum(r.total_bytes for _, r, _ in batches) / (time.perf_counter() - t0) / 1e9


def threads_seconds(worker, depth: int, sync=lambda: None) -> float:
    """Wall time of ``depth`` threads running worker(0..depth-1), device synchronised at both ends."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(depth)]
    sync()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync()
    return time.perf_counter() - t0


def time_probe(paths: list[Path], batches, depth: int) -> float:
    """Bare preadv calls on O_DIRECT fds: thread k takes reads k, k+depth, ... into its own
    reused aligned buffer (fio-style: no staging, no mapping, no GPU)."""
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
    try:
        all_reads = Reads.concat([r for _, r, _ in batches])
        jobs = list(zip(all_reads.file.tolist(), all_reads.offset.tolist(), all_reads.length.tolist()))
        size = max(int(all_reads.length.max()), ALIGN)
        import mmap

        def worker(k: int) -> None:
            buf = memoryview(mmap.mmap(-1, size))
            for f, off, n in jobs[k::depth]:
                if os.preadv(fds[f], [buf[:n]], off) != n:
                    raise OSError(f"short read at {off}")

        return all_reads.total_bytes / threads_seconds(worker, depth) / 1e9
    finally:
        for fd in fds:
            os.close(fd)


def time_c_probe(exe: str | None, paths: list[Path], size: int, depth: int, total_bytes: int, seed: int):
    if exe is None:
        return None
    out = subprocess.run([exe, str(size), str(depth), str(max(depth, total_bytes // size)), str(seed),
                          *map(str, paths)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def time_kvikio(kvikio, paths: list[Path], batches, depth: int, dev_buf, sync):
    if kvikio is None:
        return None
    try:
        kvikio.defaults.set("num_threads", depth)
    except Exception:  # noqa: BLE001 -- older API
        pass
    handles = [kvikio.CuFile(str(p), "r") for p in paths]
    try:
        all_reads = Reads.concat([r for _, r, _ in batches])
        jobs = list(zip(all_reads.file.tolist(), all_reads.offset.tolist(), all_reads.length.tolist()))
        dst = np.concatenate(([0], np.cumsum(all_reads.length)[:-1])) % (dev_buf.numel() - 2 * MIB)
        dst = dst // ALIGN * ALIGN

        def worker(k: int) -> None:
            for i in range(k, len(jobs), depth):
                f, off, n = jobs[i]
                d = int(dst[i])
                handles[f].pread(dev_buf[d:d + n], n, off).get()

        return all_reads.total_bytes / threads_seconds(worker, depth, sync) / 1e9
    finally:
        for h in handles:
            h.close()


def compile_probe() -> str | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    exe = os.path.join(tempfile.gettempdir(), "flashlab-oprobe")
    r = subprocess.run([cc, "-O2", "-pthread", "-o", exe, str(ROOT / "benchmarks" / "probes" / "oprobe.c")],
                       capture_output=True, text=True)
    return exe if r.returncode == 0 else None


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/root/flashbench", help="where the flash directory is (re)created")
    ap.add_argument("--gb", type=float, default=8.0, help="size of the flash directory (GiB of FFN records)")
    ap.add_argument("--sizes-kib", default="16,32,64,128,256,512,1024")
    ap.add_argument("--depths", default="8,32,64")
    ap.add_argument("--segment-mib", type=int, default=128, help="bytes read per timed segment")
    ap.add_argument("--batch-mib", type=int, default=64, help="bytes per loader.load call (one layer)")
    ap.add_argument("--pairs", type=int, default=3, help="loader/probe segment pairs per cell")
    ap.add_argument("--no-kvikio", action="store_true")
    ap.add_argument("--python-threads", action="store_true",
                    help="also time the loader with Python reader threads (FlashLoader(read_threads='python'); the "
                         "default is native where the C loop builds), one segment per cell: column loader_py")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    notes = [f"device: {dev_name}; torch {torch.__version__}; date {date}"]
    check = check_roundtrip(device)
    notes.append(f"correctness check on {device}: {check}")
    if not check.startswith("ok"):
        print(notes[-1])
        return 1
    notes.append(f"io_uring: {io_uring_unavailable_reason() or 'available'} (thread pool used)")
    d = flash_dir(Path(args.dir), args.gb)
    paths = d.ffn_paths
    notes.append(f"flash dir: {len(paths)} files x {d.layout.file_bytes() / MIB:.0f} MiB in {args.dir}, "
                 f"record {d.layout.record_bytes // KIB} KiB; page cache dropped: {drop_caches()}")
    exe = compile_probe()
    notes.append("c_probe: " + ("benchmarks/probes/oprobe.c, gcc -O2, one segment per cell" if exe
                                else "no C compiler: skipped"))
    kvikio, kv_note = None, "not measured (--no-kvikio)"
    dev_buf = None
    if not args.no_kvikio and cuda:
        try:
            import kvikio as _kv
            import kvikio.defaults  # noqa: F401
            dev_buf = torch.empty(args.batch_mib * MIB + 4 * MIB, dtype=torch.uint8, device=device)
            kv_note = (f"kvikio {getattr(_kv, '__version__', '?')}, compat mode preferred: "
                       f"{_kv.defaults.is_compat_mode_preferred()}; depth = its num_threads and Python threads "
                       "calling CuFile.pread into GPU memory; one segment per cell")
            kvikio = _kv
        except Exception as e:  # noqa: BLE001
            kv_note = f"kvikio not usable: {type(e).__name__}: {e}"
    notes.append("kvikio: " + kv_note)
    print("\n".join(notes), flush=True)

    sizes = [int(s) * KIB for s in args.sizes_kib.split(",")]
    depths = [int(q) for q in args.depths.split(",")]
    loaders = {q: FlashLoader(d, device=device, depth=q, max_batch_bytes=args.batch_mib * MIB) for q in depths}
    py_loaders = {q: FlashLoader(d, device=device, depth=q, max_batch_bytes=args.batch_mib * MIB,
                                 read_threads="python") for q in depths} if args.python_threads else {}
    pool = loaders[depths[0]].pool
    loop = (f"C (real/native_read.c), {pool.threads} reader threads" if pool.native
            else f"Python ({native_unavailable_reason() or 'not asked for'})")
    notes.append(f"loader: FlashLoader defaults (bounce_max={pool.bounce_max}, read loop {loop}), "
                 "next layer's reads submitted before this layer's rows are taken")
    if not all(l.direct for l in loaders.values()):
        notes.append("WARNING: O_DIRECT unavailable, loader fell back to buffered reads")
    rng = np.random.default_rng(1)
    seg = args.segment_mib * MIB
    # per cell and method: [bytes, seconds] per segment
    meas: dict[tuple[int, int], dict[str, list[tuple[int, float]]]] = {}
    t_start = time.perf_counter()

    def timed(gbps_fn, batches) -> tuple[int, float]:
        nbytes = sum(r.total_bytes for _, r, _ in batches)
        return nbytes, nbytes / gbps_fn(batches) / 1e9

    def write_tables(final: bool) -> None:

        def agg(v):
            return sum(b for b, _ in v) / sum(t for _, t in v) / 1e9 if v else None

        records = []
        lines = [f"# Loader vs raw O_DIRECT probe: GB/s into {'GPU' if cuda else 'host'} memory. Per cell {args.pairs} "
                 f"loader/probe pairs of {args.segment_mib} MiB segments, alternating which goes first, fresh random",
                 f"# offsets each segment, page cache dropped before each; {args.batch_mib} MiB per load call. "
                 "GB/s = bytes / time summed over the segments; pair ratios give the spread.",
                 *[f"# {n}" for n in notes],
                 f"# measured in {time.perf_counter() - t_start:.0f} s" + ("" if final else " (PARTIAL: run cut short)"),
                 "",
                 f"{'read_kib':>8} {'depth':>5} {'loader':>8} {'probe':>8} {'ratio':>6} {'c_probe':>8} "
                 f"{'kvikio':>8} {'loader_py':>9} {'loader_io':>9}  pair ratios (min..max)"]
        for (size, q), m in sorted(meas.items()):
            g = {k: agg(v) for k, v in m.items()}
            pair_ratios = [(lb / lt) / (pb / pt) for (lb, lt), (pb, pt) in zip(m["loader"], m["probe"])]
            rec = {"device": dev_name, "date": date, "read_kib": size // KIB, "depth": q,
                   "loader_gbps": round(g["loader"], 4), "probe_gbps": round(g["probe"], 4),
                   "ratio": round(g["loader"] / g["probe"], 4), "loader_io_gbps": round(g["loader_io"], 4),
                   "pairs": args.pairs, "segment_mib": args.segment_mib,
                   "pair_ratio_min": round(min(pair_ratios), 4), "pair_ratio_max": round(max(pair_ratios), 4)}
            if g["c_probe"] is not None:
                rec["c_probe_gbps"] = round(g["c_probe"], 4)
            if g["kvikio"] is not None:
                rec["kvikio_gbps"] = round(g["kvikio"], 4)
            if g["loader_py"] is not None:
                rec["loader_python_threads_gbps"] = round(g["loader_py"], 4)
            records.append(rec)

            def f(x):
                return f"{x:8.3f}" if x is not None else f"{'-':>8}"
            lines.append(f"{size // KIB:8d} {q:5d} {f(g['loader'])} {f(g['probe'])} {rec['ratio']:6.2f} "
                         f"{f(g['c_probe'])} {f(g['kvikio'])} {f(g['loader_py']):>9} {g['loader_io']:9.3f}  "
                         f"{min(pair_ratios):.2f}..{max(pair_ratios):.2f}")
        worst = min(records, key=lambda r: r["ratio"])
        lines += ["", f"worst loader/probe ratio: {worst['ratio']:.2f} at {worst['read_kib']} KiB, depth {worst['depth']}"]
        out = Path(args.out_dir) / "results"
        write_results(out / "loader.json", records)
        atomic_write_text(out / "loader.txt", "\n".join(lines) + "\n")
        if final:
            print("\n".join(lines))


    for size in sizes:
        for q in depths:
            m = meas.setdefault((size, q), {"loader": [], "probe": [], "c_probe": [], "kvikio": [], "loader_io": [],
                                            "loader_py": []})
            for pair in range(args.pairs):
                order = ["loader", "probe"] if pair % 2 == 0 else ["probe", "loader"]
                for method in order:
                    batches = make_batches(d.layout, size, args.batch_mib * MIB, seg, rng)   # fresh offsets
                    drop_caches()
                    if method == "loader":
                        loaders[q].reset_stats()
                        m["loader"].append(timed(lambda b: time_loader(loaders[q], b, sync), batches))
                        st = loaders[q].stats
                        m["loader_io"].append((st.bytes, st.io_seconds))
                    else:
                        m["probe"].append(timed(lambda b: time_probe(paths, b, q), batches))
            drop_caches()
            v = time_c_probe(exe, paths, size, q, seg, seed=size + q)
            if v is not None:
                m["c_probe"].append((seg, seg / v / 1e9))
            if py_loaders:
                batches = make_batches(d.layout, size, args.batch_mib * MIB, seg, rng)
                drop_caches()
                m["loader_py"].append(timed(lambda b: time_loader(py_loaders[q], b, sync), batches))
            if kvikio is not None:
                batches = make_batches(d.layout, size, args.batch_mib * MIB, seg, rng)
                drop_caches()
                try:
                    m["kvikio"].append(timed(lambda b: time_kvikio(kvikio, paths, b, q, dev_buf, sync), batches))
                except Exception as e:  # noqa: BLE001
                    notes.append(f"kvikio failed at {size // KIB} KiB q={q}: {type(e).__name__}: {e}")
                    kvikio = None
            print(f"{size // KIB:5d} KiB q={q:3d}: " + ", ".join(
                f"{k} {sum(b for b, _ in v) / sum(t for _, t in v) / 1e9:.3f}" for k, v in m.items() if v), flush=True)
            write_tables(False)   # partial results survive a time limit
    for l in [*loaders.values(), *py_loaders.values()]:
        l.close()
    write_tables(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
