"""Where a layer's time goes in the trace-driven engine: host timestamps of each phase of
``FlashFFN.run_layer`` (and of the attention/predictor/sync before it), without and with a device
sync before each stamp, for a few variants of the engine's switches.

    python benchmarks/probes/profile_engine.py [--layers 8] [--tokens 15] [--out benchmarks/probes/results/engine_profile.txt]

OPT-6.7B geometry (fp16) cut to ``--layers`` layers (the per-layer work is the same; the flash
directory is smaller to write), the synthetic trace, windowing_bundling at memory_budget 0.5.
Per variant: ms/token over ``--tokens`` tokens after 5 warm-up tokens (no stamps), then 4 tokens
with stamps (host launch times: the host's view) and 4 with a sync before every stamp (each
phase's time until the device finished it). Variants run in turn, twice, since the disk drifts.
A probe of O_DIRECT reads at the loader's depth (C loop where it builds) gives the I/O bound of the
same plans. Writes the table to --out."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import torch  # noqa: E402

from bench_engine import ensure_flash, io_lower_bound, warm_kernels  # noqa: E402
from profile_post_read import host_us  # noqa: E402
from real.engine import FlashFFN, SyntheticBody, TraceEngine  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import LayerCacheState, PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.presets import load_preset  # noqa: E402
from sim.simulator import SimResult  # noqa: E402
from sim.trace import SyntheticTraceConfig, Trace, generate_trace  # noqa: E402

VARIANTS = [  # (label, FlashFFN switches, attention as a CUDA graph), each adding one change
    # the first steps (old order, C read loop, reads first + pinned index copies) are in
    # engine_profile_run1.txt / engine_profile_run2.txt, Python vs native reader threads in
    # engine_profile_run3.txt (2026-11-23 15:12 UTC), one copy at the end vs 3 read jobs with early copies
    # in engine_profile_run4.txt (16:11 UTC); from the lean post-read path (FFN over the new rows before
    # the cache insert, fewer tensor ops per layer) on:
    # spin-waits in engine_profile_run5.txt (16:25 UTC); host waits vs gated copy+FFN in engine_profile.txt
    # before 2026-11-23 17:30 UTC (those runs' tables are in git history); from here:
    ("host waits, then copies", dict(read_threads="native", gate_reads=False), True),
    ("+ gated copy and FFN", dict(read_threads="native", gate_reads=True), True),
    ("+ 3 gated chunk copies", dict(read_threads="native", gate_reads=True, copy_chunks=3), True),
]


def phases(marks: list[tuple[str, float]]) -> dict[str, float]:
    """Mean microseconds per layer of each phase (the span ending at each mark)."""
    sums, layers = defaultdict(float), 0
    for (a, ta), (b, tb) in zip(marks, marks[1:]):
        if b == "layer":
            layers += 1
            continue
        sums[b] += (tb - ta) * 1e6
    layers = max(layers, 1)
    return {k: v / layers for k, v in sums.items()}


def attention_micro(body: SyntheticBody, pos: int, reps: int = 50) -> dict[str, float]:
    """Host launch time and device time of attention + norm + predictor of one layer, and of the
    same captured in a CUDA graph (fixed position: an estimate of what graphing would save)."""
    h = torch.randn(1, body.spec.d_model, device=body.device).to(body.emb.dtype)

    def step():
        return body.front_eager(0, h, pos, True)

    host_us_, synced_us = host_us(step, reps, keep_busy=False)
    out = {"launch_us": host_us_, "launch+sync_us": synced_us}
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            g.replay()
            torch.cuda.synchronize()
        out["graph+sync_us"] = (time.perf_counter() - t) / reps * 1e6
    except Exception as e:  # noqa: BLE001 -- an estimate only
        out["graph_error"] = f"{type(e).__name__}: {e}"[:120]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=15)
    ap.add_argument("--flash-dir", default="/root/flash")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "probes" / "results" / "engine_profile.txt"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = ModelSpec.preset("opt-6.7b")
    spec = dataclasses.replace(base, name=f"opt-6.7b-{args.layers}l", n_layers=args.layers)
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.5})
    # the full model's budget gives the per-layer cache size; keep it for the cut model
    capacity = PolicyEngine(base, pol).capacity
    warm, timed, stamped = 5, args.tokens, 4
    n_tok = warm + timed + 2 * stamped
    trace = generate_trace(spec, SyntheticTraceConfig.from_preset(tokens=n_tok, seed=0))

    def plans():
        eng = PolicyEngine(spec, Policy.from_dict({**pol.to_dict(), "memory_budget": 1.0}))
        eng.policy = pol
        eng.capacity = capacity          # the full model's per-layer cache size
        eng.caches = [LayerCacheState(spec.d_ff, capacity) for _ in range(spec.n_layers)]
        return list(eng.plan_trace(Trace(active=trace.active)))

    tr_plans = plans()
    assert all(len(lp) == spec.n_layers for lp in tr_plans)
    flash, secs = ensure_flash(spec, Path(args.flash_dir), True, device)
    lines = [f"# engine phase profile: {spec.name} fp16 ({spec.n_layers} layers of opt-6.7b), windowing_bundling, "
             f"budget 0.5 (cache {capacity} rows/layer); device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; flash written in {secs:.0f} s"]
    if device.type == "cuda":
        lines.append(f"# kernel warm-up {warm_kernels(spec, device, 'auto'):.1f} s")
    body = SyntheticBody(spec, device, max_tokens=n_tok, predictor_rank=128, seed=0, kernel="auto")
    probes: dict = {}
    rows = []
    for rnd in range(2):
        for label, kw, graphs in VARIANTS:
            ffn = FlashFFN(flash, capacity, device=device, threads=pol.reads_in_flight, **kw)
            try:
                if rnd == 0 and not probes:
                    bound, gbps = io_lower_bound(tr_plans[: warm + timed], warm, ffn, probes, (True, 32))
                    lines.append(f"# io bound of the timed tokens: {bound * 1e3:.1f} ms/token ({gbps} GB/s probe)")
                body.graphs = graphs and device.type == "cuda"
                eng = TraceEngine(body, ffn, pol)
                costs = eng.run(tr_plans[: warm + timed])
                summ = SimResult(tokens=costs).summary(warm)
                prof = {}
                for sync in (False, True):
                    ffn.marks, ffn.mark_sync = [], sync
                    for t in range(warm + timed + (stamped if sync else 0),
                                   warm + timed + stamped + (stamped if sync else 0)):
                        eng.token(t, tr_plans[t])
                    prof[sync] = phases(ffn.marks)
                    ffn.marks = None
            finally:
                ffn.close()
            rows.append((rnd, label, summ, prof))
            print(f"round {rnd} {label}: {summ['latency_ms']:.1f} ms/token io {summ['io_ms']:.1f}", flush=True)
    lines.append("")
    lines.append(f"{'variant':<36} {'round':>5} {'ms/tok':>8} {'io_ms':>7} {'mem_ms':>7} {'cmp_ms':>7} "
                 f"{'non-io ms/layer':>15}")
    for rnd, label, summ, _ in rows:
        lines.append(f"{label:<36} {rnd:>5} {summ['latency_ms']:8.1f} {summ['io_ms']:7.1f} {summ['mem_ms']:7.2f} "
                     f"{summ['compute_ms']:7.1f} {(summ['latency_ms'] - summ['io_ms']) / spec.n_layers:15.3f}")
    names = ["attention", "sync", "plan", "submit", "ffn_resident", "evict", "wait", "copy",
             "ffn_new", "insert"]
    lines.append("")
    lines.append("per-layer phase times, us (host stamps; 'sync' columns: device synced before each stamp); round 1")
    lines.append(f"{'phase':<14}" + "".join(f"{lab[:26]:>28}" for _, lab, _, _ in rows[len(VARIANTS):]))
    for n in names:
        cells = []
        for _, _, _, prof in rows[len(VARIANTS):]:
            a, b = prof[False].get(n), prof[True].get(n)
            cells.append(("-" if a is None else f"{a:8.0f}") + " /" + ("-" if b is None else f"{b:8.0f}") + " sync")
        lines.append(f"{n:<14}" + "".join(f"{c:>28}" for c in cells))
    if device.type == "cuda":
        lines.append("")
        lines.append(f"attention+norm+predictor of one layer (pos 20): {attention_micro(body, 20)}")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
