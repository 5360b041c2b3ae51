"""Side by side with what users run instead: one checkpoint, one memory budget, one disk, cold.

    python benchmarks/bench_peers.py --model opt-6.7b --work /root/peers [--memory-budget 0.5] [--tokens 8]
    python benchmarks/bench_peers.py --model opt-small --work /tmp/peers --inprocess        # CPU smoke run

Builds (once) a random-init checkpoint of the preset in the Hugging Face layout (``scripts/build_checkpoint.py``'s
``build_random_checkpoint``, fp16 for 7B presets) in ``--work``, converts it once (``real.convert``, bundled), and
runs each system on it, each in its own process (so peak host RSS and GPU memory are its own):

(a) ``accelerate``: Hugging Face accelerate's disk offload: ``from_pretrained(device_map=..., offload_folder=...)``
    with the device map ``infer_auto_device_map`` computes for ``max_memory`` = the budget on the GPU and 0 on the
    host, so what does not fit is read from disk by accelerate's hooks at every token (dense);
(b) ``flexgen`` and ``deepspeed`` (ZeRO-Inference NVMe offload): run if importable; on the lent GPU machine they are
    not (no network, not in the carried wheels), and the record says so;
(c) ``flashlab-naive`` (every FFN weight not pinned in the budget is read each token, 1 MiB sequential chunks; on the
    bundled file, the same bytes as the unbundled ones, so one flash copy fits the disk) and ``flashlab-best``
    (windowing + bundling, 64 reads in flight, frequency eviction, cache warm-started from an activation profile:
    ``bench_engine``'s best step) through ``real.engine.HFFlashModel``: the checkpoint's attention, embeddings,
    norms and KV cache on the device, every FFN from flash.

A random-init checkpoint has no realistic activation sparsity (about half of its ReLU neurons fire) nor reuse, so
Flashlab's active sets come from the calibrated synthetic trace (``conf/trace/synthetic.yaml``: 97% sparsity, ~2.4%
of the neurons new per token at window 5; a rank-128 predictor's work is run on the device per layer), while the
weights, attention and KV cache are the checkpoint's; the output text is then not the model's. The peers compute
the dense model either way.

Cold: before each measured token the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root:
the lent GPU machine has it), so no system serves weights from RAM; Flashlab reads with O_DIRECT anyway. Where that
is not possible (not root) the records say ``cold: false``. Per system: per-token latency (mean of the measured
tokens, after warm-up: 1 token for the peers and naive, 5 for the windowing policy), tokens/s, bytes read per token
(Flashlab: its plans' reads; accelerate: the bytes of the weights it maps to disk, plus the bytes /proc/self/io says
the process read from storage), peak host RSS, peak GPU memory.

Writes ``<out>/results/peers.json`` (flat records ``device, date, model, system, memory_budget, tokens, latency_ms,
tokens_per_s, bytes_per_token, peak_host_gib, peak_gpu_gib`` + notes) and the table ``<out>/results/peers.txt``
(``--out`` default: benchmarks/). Disk: the checkpoint (13.4 GB at OPT-6.7B fp16), its flash conversion (13.4 GB) and
accelerate's offload folder (up to the offloaded share, deleted afterwards)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_outputs  # noqa: E402

SYSTEMS = ("accelerate", "flexgen", "deepspeed", "flashlab-naive", "flashlab-best")
KEYS = ("device", "date", "model", "system", "memory_budget", "tokens", "latency_ms", "tokens_per_s",
        "bytes_per_token", "peak_host_gib", "peak_gpu_gib")
BEST = {"reads_in_flight": 64, "eviction": "frequency", "warm_start": True}   # bench_engine's wb+freq+warm+depth64
CALIBRATION_TOKENS = 512
WARMUP = {"flashlab-best": 5}        # others: 1 (the first token reads everything / fills nothing worth waiting for)


# ---- measuring -----------------------------------------------------------------------------------------
def io_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30     # Linux: KiB


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Timer:
    """Per-token loop shared by the workers: drop caches (outside the timing), then time ``step``."""

    def __init__(self, cold: bool):
        self.cold = cold
        self.dropped = True

    def token(self, step):
        import torch
        from bench_loader import drop_caches        # sync; echo 3 > /proc/sys/vm/drop_caches (root), else False
        if self.cold:
            self.dropped = drop_caches() and self.dropped
        io0 = io_read_bytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt_s = time.perf_counter() - t0
        io1 = io_read_bytes()
        return out, dt_s, (io1 - io0) if io0 is not None and io1 is not None else None


def _record(args, system: str, lat: list[float], bytes_per_token, io_bytes: list, notes: str, cold: bool) -> dict:
    import numpy as np
    import torch
    mean = float(np.mean(lat)) if lat else None
    io = [b for b in io_bytes if b is not None]
    return {"device": device_name(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": args.model, "system": system, "memory_budget": args.memory_budget, "tokens": len(lat),
            "latency_ms": round(mean * 1e3, 2) if mean else None,
            "tokens_per_s": round(1.0 / mean, 3) if mean else None,
            "bytes_per_token": int(bytes_per_token) if bytes_per_token is not None else None,
            "peak_host_gib": round(peak_host_gib(), 3),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            "storage_read_bytes_per_token": int(np.mean(io)) if io else None,
            "cold": cold, "notes": notes}


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    import numpy as np
    return [int(t) for t in np.random.default_rng(seed).integers(4, vocab, n)]


# ---- (c) Flashlab ------------------------------------------------------------------------------------------
def run_flashlab(args, system: str) -> dict:
    import numpy as np
    import torch

    from real.engine import HFFlashModel, resolve_device
    from real.flash_dir import FlashDir
    from real.hf_checkpoint import Checkpoint
    from sim.plan import predictor_rank
    from sim.policy import Policy
    from sim.presets import load_preset
    from sim.trace import SyntheticTraceConfig, generate_trace

    ckpt = Checkpoint.open(args.ckpt)
    flash = FlashDir.open(args.flash)
    spec = flash.spec
    best = system == "flashlab-best"
    pol = Policy.from_dict({**Policy.preset("windowing_bundling" if best else "naive").to_dict(),
                            "memory_budget": args.memory_budget, "bundling": True, **(BEST if best else {})})
    warm = WARMUP.get(system, 1)
    n = warm + args.tokens
    knobs = {k: v for k, v in load_preset("trace", "synthetic").items() if k != "kind"}
    trace = generate_trace(spec, SyntheticTraceConfig.from_dict(
        {**knobs, "tokens": n, "seed": 0, "calibration_tokens": CALIBRATION_TOKENS if best else 0}))
    device = resolve_device(args.device)
    m = HFFlashModel.from_checkpoint(ckpt, flash, pol, device=device, active_sets=trace.active if pol.sparse else None,
                                     timing_rank=predictor_rank(spec, pol) if pol.sparse else 0,
                                     threads=pol.reads_in_flight,
                                     calibration_counts=trace.calibration_counts if pol.warm_start else None)
    timer = Timer(not args.no_drop_caches)
    lat, io, nbytes = [], [], []
    try:
        ids = prompt_ids(spec.vocab, n + 1)
        for i in range(n):
            (_, tc), wall, rd = timer.token(lambda: m.step(torch.tensor([[ids[i]]])))
            if i >= warm:
                lat.append(tc.latency_s)
                io.append(rd)
                nbytes.append(tc.bytes)
            if sum(lat) > args.measure_s:
                break
    finally:
        m.close()
    notes = (f"{'windowing+bundling, 64 reads in flight, frequency eviction, warm start from ' + str(CALIBRATION_TOKENS) + ' calibration tokens' if best else 'naive: non-pinned FFN read every token in 1 MiB chunks (bundled file)'}; "
             f"FFN cache {m.engine.capacity} of {spec.d_ff} neurons per layer; active sets from the calibrated synthetic "
             f"trace (sparsity {1 - trace.active.mean():.3f}; a random-init checkpoint has no realistic sparsity), "
             f"weights/attention/KV cache the checkpoint's; {warm} warm-up token(s) excluded; O_DIRECT")
    if not timer.dropped:
        notes += "; page cache NOT dropped (not root)"
    return _record(args, system, lat, float(np.mean(nbytes)) if nbytes else None, io, notes,
                   timer.cold and timer.dropped)


# ---- (a) accelerate disk offload ---------------------------------------------------------------------------
def run_accelerate(args, system: str) -> dict:
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from real.engine import cache_kwargs, returned_cache
    from real.hf_checkpoint import Checkpoint

    ckpt = Checkpoint.open(args.ckpt)
    spec = ckpt.spec()
    dtype = getattr(torch, spec.dtype)
    budget = int(args.memory_budget * spec.total_bytes)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    max_memory = {0: budget, "cpu": 0} if gpu else {"cpu": budget}
    config = AutoConfig.from_pretrained(args.ckpt)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    empty = empty.to(dtype)
    empty.tie_weights()
    dmap = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=empty._no_split_modules,
                                 dtype=dtype)
    if getattr(config, "tie_word_embeddings", False) and "lm_head" in dmap:
        # the tied head is the embedding itself: accelerate's disk index holds it under the embedding's name only
        emb = next(n for n, _ in empty.named_parameters() if n.endswith("embed_tokens.weight"))
        dmap["lm_head"] = next(v for k, v in dmap.items() if k == "" or emb == k or emb.startswith(k + "."))
    sizes = {n: p.numel() * p.element_size() for n, p in empty.named_parameters()}   # tied: counted once
    on_disk = sum(b for n, b in sizes.items() if any((n == k or n.startswith(k + ".") or k == "")
                                                      and v == "disk" for k, v in dmap.items()))
    del empty
    offload = Path(args.work) / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype, device_map=dmap, offload_folder=str(offload))
    model.eval()
    dev = torch.device("cuda:0" if gpu else "cpu")
    timer = Timer(not args.no_drop_caches)
    lat, io = [], []
    warm = WARMUP.get(system, 1)
    past = None
    ids = prompt_ids(spec.vocab, warm + args.tokens + 1)
    try:
        with torch.no_grad():
            for i in range(warm + args.tokens):
                def step():
                    return model(input_ids=torch.tensor([[ids[i]]], device=dev), use_cache=True,
                                 **cache_kwargs(model, past))
                out, wall, rd = timer.token(step)
                past = returned_cache(out)
                if i >= warm:
                    lat.append(wall)
                    io.append(rd)
                if sum(lat) > args.measure_s:       # a slow peer: fewer tokens, measured all the same
                    break
    finally:
        model = None                             # noqa: F841 -- frees it before the folder goes
        shutil.rmtree(offload, ignore_errors=True)
    import accelerate
    placed = {v: 0 for v in set(dmap.values())}
    for k, v in dmap.items():
        placed[v] += sum(b for n, b in sizes.items() if n == k or n.startswith(k + ".") or k == "")
    notes = (f"accelerate {accelerate.__version__}: device_map from infer_auto_device_map(max_memory={ {str(k): v for k, v in max_memory.items()} }), "
             f"offload_folder; placed GB: { {str(k): round(v / 1e9, 3) for k, v in placed.items()} }; dense compute; "
             f"bytes_per_token = the disk-mapped weights' bytes; {warm} warm-up token excluded")
    if not timer.dropped:
        notes += "; page cache NOT dropped (not root)"
    return _record(args, system, lat, on_disk, io, notes, timer.cold and timer.dropped)


# ---- (b) FlexGen / DeepSpeed ZeRO-Inference ------------------------------------------------------------------
def empty_record(args, system: str, notes: str) -> dict:
    """The record of a system that measured nothing, with the same keys as a measured one."""
    return {"device": device_name(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": args.model, "system": system, "memory_budget": args.memory_budget, "tokens": 0,
            "latency_ms": None, "tokens_per_s": None, "bytes_per_token": None, "peak_host_gib": None,
            "peak_gpu_gib": None, "storage_read_bytes_per_token": None, "cold": None, "notes": notes}


def not_available(args, system: str) -> dict:
    """The record of FlexGen / DeepSpeed: why it did not run."""
    module = {"flexgen": "flexgen", "deepspeed": "deepspeed"}[system]
    if importlib.util.find_spec(module) is None:
        why = (f"not run: `import {module}` fails here: not installed, and the lent GPU machine has no network and "
               f"{module} is not among the carried wheels (scripts/build_wheels.sh)")
        if system == "deepspeed":
            why += ("; ZeRO-Inference NVMe offload also needs DeepSpeed's async_io op, JIT-built against libaio and "
                    "the CUDA toolkit at first use")
        else:
            why += "; FlexGen also needs its own numpy weight format, converted from the HF checkpoint"
    else:
        why = f"not run: {module} imports here, but this benchmark has no driver for it yet"
    return empty_record(args, system, why)


WORKERS = {"accelerate": run_accelerate, "flashlab-naive": run_flashlab, "flashlab-best": run_flashlab}


def worker(args) -> dict:
    if args.worker in ("flexgen", "deepspeed"):
        return not_available(args, args.worker)
    if args.worker == "accelerate" and importlib.util.find_spec("accelerate") is None:
        return empty_record(args, "accelerate", "not run: accelerate is not importable here")
    if args.device == "cpu" or not __import__("torch").cuda.is_available():
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return WORKERS[args.worker](args, args.worker)


# ---- driver ------------------------------------------------------------------------------------------------
def prepare(args) -> tuple[Path, Path]:
    """The checkpoint and its flash conversion in ``--work`` (built / converted once)."""
    from real.hf_checkpoint import build_random_checkpoint, converted_flash, Checkpoint
    from sim.model_spec import ModelSpec

    spec = ModelSpec.preset(args.model)
    work = Path(args.work).expanduser()
    t0 = time.perf_counter()
    ckpt_dir = build_random_checkpoint(spec, work / f"ckpt-{spec.name}-{spec.dtype}", progress=not args.no_progress)
    print(f"checkpoint {ckpt_dir} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    flash = converted_flash(Checkpoint.open(ckpt_dir), work / "flash", bundled=True, progress=not args.no_progress)
    print(f"flash directory {flash.root} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    return ckpt_dir, flash.root


def run_system(args, system: str) -> dict:
    if args.inprocess:
        sub = argparse.Namespace(**{**vars(args), "worker": system})
        return worker(sub)
    with_out = Path(args.work) / f"record-{system}.json"
    with_out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--model", args.model,
           "--ckpt", str(args.ckpt), "--flash", str(args.flash), "--work", str(args.work), "--memory-budget",
           str(args.memory_budget), "--tokens", str(args.tokens), "--device", args.device, "--record", str(with_out),
           "--measure-s", str(args.measure_s)]
    if args.no_drop_caches:
        cmd.append("--no-drop-caches")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, timeout=args.time_limit, capture_output=True, text=True)
        tail = (p.stdout + p.stderr)[-1500:]
        if p.returncode == 0 and with_out.exists():
            return json.loads(with_out.read_text())
        why = f"failed (exit {p.returncode}): {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        print(tail, file=sys.stderr)
    except subprocess.TimeoutExpired:
        why = f"stopped after {args.time_limit} s (--time-limit)"
    return empty_record(args, system, f"not measured: {why} ({time.perf_counter() - t0:.0f} s)")


def table(records: list[dict], args) -> list[str]:
    r0 = records[0]
    acc = next((r["latency_ms"] for r in records if r["system"] == "accelerate" and r["latency_ms"]), None)
    lines = [f"# bench_peers: {args.model}, memory budget {args.memory_budget} of the model's bytes, the same checkpoint "
             f"and disk; device {r0['device']}; {r0['date']}",
             "# cold: page cache dropped before every measured token (drop_caches) where cold=True; Flashlab reads "
             "with O_DIRECT. Flashlab's active sets: the calibrated synthetic trace (a random-init checkpoint has no "
             "realistic sparsity); the peers compute the dense model.",
             f"{'system':16s} {'ms/token':>10s} {'tokens/s':>9s} {'MB/token':>10s} {'host GiB':>9s} {'GPU GiB':>8s} "
             f"{'vs accel.':>9s} cold"]
    def fmt(v, f):
        width = int(f.split(".")[0])
        return f"{'-':>{width}s}" if v is None else format(v, f)
    for r in records:
        ratio = acc / r["latency_ms"] if acc and r["latency_ms"] else None
        lines.append(f"{r['system']:16s} {fmt(r['latency_ms'], '10.1f')} {fmt(r['tokens_per_s'], '9.3f')} "
                     f"{fmt(None if r['bytes_per_token'] is None else r['bytes_per_token'] / 1e6, '10.1f')} "
                     f"{fmt(r['peak_host_gib'], '9.2f')} {fmt(r['peak_gpu_gib'], '8.2f')} "
                     f"{(fmt(ratio, '8.1f') + 'x') if ratio else fmt(None, '9'):>9s} {r['cold']}")
    lines += ["", "notes:"] + [f"- {r['system']}: {r['notes']}" for r in records]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-6.7b", help="model preset (conf/model/); opt-small for a CPU smoke run")
    ap.add_argument("--work", default="/tmp/flashlab-peers", help="checkpoint, flash directory, offload folder")
    ap.add_argument("--memory-budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=8, help="measured tokens per system (after warm-up)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="root of results/ (peers.json, peers.txt)")
    ap.add_argument("--time-limit", type=int, default=420, help="seconds per system (subprocess), loading included")
    ap.add_argument("--measure-s", type=float, default=120.0,
                    help="stop a system's measured tokens once they took this long (a slow peer measures fewer)")
    ap.add_argument("--inprocess", action="store_true", help="run the systems in this process (smoke tests; peak "
                    "memory is then the whole run's)")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache (records cold=False)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flash", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        rec = worker(args)
        Path(args.record).write_text(json.dumps(rec))
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"error: --systems: unknown {bad[0]!r}. Fix: use some of {','.join(SYSTEMS)}", file=sys.stderr)
        return 2
    args.ckpt, args.flash = prepare(args)
    records = []
    for s in systems:
        t0 = time.perf_counter()
        rec = run_system(args, s)
        print(f"{s}: {rec['latency_ms']} ms/token ({time.perf_counter() - t0:.0f} s) {rec['notes'][:120]}", flush=True)
        records.append(rec)
        write_outputs(args.out, "peers", table(records, args), records, echo=False)   # a crash keeps the rest
    write_outputs(args.out, "peers", table(records, args), records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
