"""Re-simulate measured engine runs on the CPU: how well does each hardware profile predict them?

    python benchmarks/resim_engine.py [benchmarks/results/engine.json ...]
                                      [--hardware h100-vda,h100-calibrated,h100-calibrated-fit]

For every record of a ``bench_engine.py`` results file this rebuilds the very plans the engine executed
(the same synthetic trace, policy step and tokens; warm-up excluded alike) and predicts the per-token
latency with each profile. No GPU, no torch: the question "which profile predicts that machine?" can be
asked of any measured run, and of a profile made later (e.g. a re-fit). Records from before
``trace_tokens`` was stored assume bench_engine's default token counts (a 69-token trace, seed 0, no calibration tokens).
Prints the table and writes results/resim_engine.txt and results/resim_engine.json under --out-dir.

    python benchmarks/resim_engine.py RESULTS... --fit conf/hardware/h100-engine-fit.yaml

instead fits the simulator's timing constants (not the disk: each step is timed at its own probes) to the
records, with whole steps held out, as experiments.calibrate_sim fits backend=both runs.

The steps bench_engine.py runs (STEPS) are defined here, torch-free, so that this side rebuilds a measured
step's policy from its label; overrides that are not policy fields (ENGINE_ONLY) are the engine's and
loader's switches, which bench_engine pops before building the policy. The earlier runs the current figures
were computed over are in benchmarks/validation/engine_runs/."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from _results import load_records, regroup, write_results  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from sim.hardware import HardwareProfile  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.presets import load_preset  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.trace import SyntheticTraceConfig, generate_trace  # noqa: E402

ENGINE_ONLY = ("read_threads", "direct_dispatch", "copy_chunks", "gate_reads", "defer_insert", "pipeline")

STEPS = [  # (label, policy preset, overrides, token group)
    ("naive", "naive", {}, "naive"),
    ("predictor", "predictor", {}, "unbundled"),
    ("windowing", "windowing", {}, "unbundled"),
    ("windowing_bundling", "windowing_bundling", {}, "main"),
    ("wb+depth64", "windowing_bundling", {"reads_in_flight": 64}, "main"),
    ("wb+depth128", "windowing_bundling", {"reads_in_flight": 128}, "main"),
    ("wb+lru", "windowing_bundling", {"eviction": "lru"}, "main"),
    ("wb+lru+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lru"}, "main"),
    ("wb+lfu", "windowing_bundling", {"eviction": "lfu"}, "main"),
    ("wb+lfu+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu"}, "main"),
    ("wb+lfu+depth128", "windowing_bundling", {"reads_in_flight": 128, "eviction": "lfu"}, "main"),
    # the cache filled at the first (warm-up) token with the hottest neurons of an activation profile (the trace's
    # calibration tokens, which are not measured), then kept by how often neurons fire, window or not
    ("wb+freq+warm+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                    "warm_start": True}, "main"),
    # each layer's cache insert queued after the next layer's reads are submitted (real.engine FlashFFN defer_insert)
    ("wb+freq+warm+depth64+deferinsert", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                                "warm_start": True, "defer_insert": True}, "main"),
    ("wb+lfu+warm+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "warm_start": True},
     "main"),
    # kernels launched through Triton's autotuner on every call (before 2026-11-23 15:40 UTC) instead of
    # directly with the config it chose for that shape
    ("wb+lfu+depth64+autotuner", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                        "direct_dispatch": False}, "main"),
    # a layer's reads as three loader jobs, the host waiting for each and then queueing its copy to the
    # device, instead of one job copied at the end (real.engine.COPY_CHUNKS; measured before gating existed)
    ("wb+lfu+depth64+3copies", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "copy_chunks": 3,
                                                      "gate_reads": False}, "main"),
    # three loader jobs, each job's copy queued on the device behind a wait on its own flag (gated), so all
    # but the last chunk's copy overlap the reads. (validation/engine_runs/engine-chunks*.json, 17:24-17:33 UTC,
    # also ran a layer's cache insert deferred to while the next layer's reads flew, the default there;
    # "+insertnow" steps inserted at once, as the engine does since: no consistent difference, so the deferral
    # was removed)
    ("wb+lfu+depth64+3chunks", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "copy_chunks": 3},
     "main"),
    # the host waits for a layer's reads, then queues the copy of the new rows and the FFN over them (before
    # 2026-11-23 16:40 UTC) instead of queueing both before the reads end, behind a device-side wait on a flag
    # the reader threads set (real.engine.GATE_READS; labelled "+gated" in that run, engine-gated.txt in git history)
    ("wb+lfu+depth64+hostwait", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                       "gate_reads": False}, "main"),
    # look-ahead (issue 28, docs/lookahead.md): layer l+1's look-ahead set read while layer l runs (the trace needs
    # look-ahead sets: bench_engine.py --trace opt-6.7b-paper-lookahead); "+nopipe": the same plans with the early
    # reads issued together with the late ones at the layer's start (what the pipelining alone buys)
    ("wb+freq+warm+depth64+lookahead", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                              "warm_start": True, "lookahead": 1}, "main"),
    ("wb+freq+warm+depth64+lookahead+nopipe", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                                     "warm_start": True, "lookahead": 1,
                                                                     "pipeline": False}, "main"),
    ("wb+freq+warm+depth64+lookahead+coalesce", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                                       "warm_start": True, "lookahead": 1,
                                                                       "coalesce_gap": 1, "chunk_kib": 64}, "main"),
    ("wb+depth64+lookahead", "windowing_bundling", {"reads_in_flight": 64, "lookahead": 1}, "main"),
    ("wb+concat", "windowing_bundling", {"mem_strategy": "concat"}, "unbundled"),   # memory-management baseline
    # the loader's Python reader threads instead of its default native (pthread) pool; the 2026-11-23 15:00 UTC
    # run had Python as the default and labelled the native steps "+native" instead
    ("wb+pythreads", "windowing_bundling", {"read_threads": "python"}, "main"),
    ("wb+lfu+pythreads", "windowing_bundling", {"eviction": "lfu", "read_threads": "python"}, "main"),
    ("wb+lfu+depth64+pythreads", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                        "read_threads": "python"}, "main"),
]

RECORDED = ("memory_budget", "window", "bundling", "chunk_kib", "reads_in_flight", "eviction",
            "warm_start", "lookahead", "coalesce_gap")  # policy fields
DEFAULT_TRACE_TOKENS = 69      # bench_engine's defaults: 5 warm-up + max(64, 10, 3) measured


def drift_factor(hw: HardwareProfile, rec: dict) -> float | None:
    """How much faster the disk read during this step than ``hw`` says: the step's own O_DIRECT probes (the
    mean of the one before and the one after its tokens, at each of its read sizes, at its depth) over the
    profile's table at the same size and depth; the geometric mean over sizes. None without probes. ``rec``
    as written (flat: ``probe_gbps.16KiB``) or as ``load_records`` gives it (nested)."""
    rec = regroup(rec)
    before, after = rec.get("probe_gbps") or {}, rec.get("probe_after_gbps") or {}
    ratios = []
    for key, gbps in before.items():
        measured = (gbps + after[key]) / 2 if key in after else gbps
        size = float(key.removesuffix("KiB")) * 1024
        ratios.append(measured / float(hw.read_throughput_gbps(size, rec["reads_in_flight"])))
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else None


def at_probe(hw: HardwareProfile, factor: float) -> HardwareProfile:
    """``hw`` with its flash (random-read table and sequential rate) scaled by ``factor``: the disk as it was."""
    return hw.with_changes(name=f"{hw.name}@probe", read_gbps=(np.asarray(hw.read_gbps) * factor).tolist(),
                           seq_gbps=hw.seq_gbps * factor)


def rebuild(rec: dict, traces: dict) -> tuple[ModelSpec, Policy, list, int]:
    """The spec, policy, plans and warm-up count a measured record ran (``traces`` caches generated traces)."""
    steps = {s[0]: s for s in STEPS}
    head = rec["policy"].split("+")[0]
    if rec["policy"] in steps:
        _, preset, over, _ = steps[rec["policy"]]
    elif head in steps or head == "wb":       # a step since removed: its preset; the record has the rest
        preset, over = ("windowing_bundling" if head == "wb" else steps[head][1]), {}
    else:
        raise SystemExit(f"{rec['policy']!r}: not a bench_engine step. Fix: use a results file of bench_engine.py")
    over = {k: v for k, v in over.items() if k not in ENGINE_ONLY}
    ran = {k: rec[k] for k in RECORDED if k in rec}           # what the record says ran wins
    spec = ModelSpec.preset(rec["model"])
    pol = Policy.from_dict({**Policy.preset(preset).to_dict(), **over, **ran})
    key = (rec["model"], rec.get("trace_tokens", DEFAULT_TRACE_TOKENS), rec.get("trace_seed", 0),
           rec.get("trace_calibration_tokens", 0), rec.get("trace") or "synthetic")
    if key not in traces:
        traces[key] = generate_trace(spec, SyntheticTraceConfig.from_preset(key[4], tokens=key[1], seed=key[2],
                                                                            calibration_tokens=key[3]))
    warm = rec["warmup"]
    plans = list(PolicyEngine(spec, pol).plan_trace(traces[key].first(warm + rec["tokens"])))
    return spec, pol, plans, warm


def predict(rec: dict, profiles: dict[str, HardwareProfile], traces: dict) -> dict[str, float]:
    """Predicted ms per token of one measured record under each profile."""
    spec, pol, plans, warm = rebuild(rec, traces)
    return {name: simulate(spec, hw, pol, plans=plans).summary(warm)["latency_ms"] for name, hw in profiles.items()}


class _AtProbe:
    """One record's plans, re-timed on any profile scaled to the record's own disk probes."""

    def __init__(self, rec: dict):
        rec = regroup(rec)
        if not rec.get("probe_gbps"):
            raise SystemExit(f"{rec.get('policy')!r} (repeat {rec.get('repeat', 0)}): the record has no probe_gbps, so "
                             "its disk rate is unknown. Fix: leave such records out (bench_engine runs record probes)")
        self.rec = rec
        self.spec, self.pol, self.plans, self.warm = rebuild(rec, _TRACES)

    def predict(self, hw: HardwareProfile) -> float:
        hw = at_probe(hw, drift_factor(hw, self.rec))
        return simulate(self.spec, hw, self.pol, plans=self.plans).summary(self.warm)["latency_ms"]


_TRACES: dict = {}


@dataclass
class EnginePoint:
    """A measured bench_engine step as a point for experiments.calibrate_sim.fit (predicted at its probes)."""
    rec: dict
    measured_ms: float
    label: str = ""

    def prepare(self) -> _AtProbe:
        return _AtProbe(self.rec)


FIT_PARAMS = ("io_overhead_us", "op_overhead_us", "row_op_us", "compute_gbps", "mem_gbps")  # not read_scale:
# scaling to each step's probes cancels it


def fit_at_probe(paths: list[str], base: HardwareProfile, out: Path, jobs: int, seed: int,
                 report_stem: Path) -> dict:
    """Fit the simulator's constants (FIT_PARAMS) to the measured steps with the disk drift taken out; the
    steps are split by step (every measurement of a step, in any run, stays on one side: the held-out steps
    are configurations the fit never saw), a seeded half fitted and the rest held out. Writes the profile
    (its flash table stays the base's) and ``report_stem``.json / .txt."""
    from experiments.calibrate_sim import fit, format_report

    points = [EnginePoint(rec, float(rec["latency_ms"]), rec["policy"])
              for p in paths for rec in load_records(p) if rec.get("probe_gbps")]
    cal = fit(points, base, params=FIT_PARAMS, overlap="keep", seed=seed, name=out.stem, jobs=jobs,
              max_evals=120, groups=[p.label for p in points])
    files = ", ".join(Path(p).name for p in paths)
    cal.profile.to_yaml(out, header=f"# Fitted by benchmarks/resim_engine.py --fit: {cal.fit_idx.size} of {len(points)} "
                                    f"bench_engine steps ({files}) fitted, {cal.heldout_idx.size} held out\n# (whole "
                                    "steps), each predicted with the flash scaled to its own disk probes: use "
                                    "it that way (--at-probe); the flash table is the base profile's.\n")
    text = format_report(cal.report)
    report = {**cal.report, "results": [str(p) for p in paths], "split": "by step (all its rounds and runs on one side)",
              "heldout": sorted({points[i].label for i in cal.heldout_idx})}
    report_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    atomic_write_text(report_stem.with_suffix(".txt"), f"# resim_engine.py --fit {files} (seed {seed})\n{text}\n")
    print(text)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", default=[str(ROOT / "benchmarks" / "results" / "engine.json")])
    ap.add_argument("--hardware", default="h100-vda,h100-calibrated,h100-calibrated-fit")
    ap.add_argument("--at-probe", default="h100-calibrated-fit",
                    help="also predict with this profile's flash scaled to each step's own probes (disk drift "
                         "removed: what is left is the simulator's error); '' to skip")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    ap.add_argument("--fit", default=None, metavar="OUT.yaml",
                    help="instead: fit the --at-probe profile's constants to these runs (drift taken out), whole "
                         "steps held out; writes the profile there and its report to "
                         "benchmarks/validation/<stem>.json/.txt")
    ap.add_argument("--jobs", type=int, default=2, help="--fit: worker processes")
    ap.add_argument("--seed", type=int, default=0, help="--fit: seeds the fit / held-out split")
    args = ap.parse_args(argv)
    if args.fit:
        out = Path(args.fit)
        fit_at_probe(args.results, HardwareProfile.from_dict(load_preset("hardware", args.at_probe or
                                                                         "h100-calibrated-fit")),
                     out, args.jobs, args.seed, ROOT / "benchmarks" / "validation" / out.stem)
        return 0
    profiles = {h: HardwareProfile.from_dict(load_preset("hardware", h)) for h in args.hardware.split(",")}
    base = HardwareProfile.from_dict(load_preset("hardware", args.at_probe)) if args.at_probe else None
    columns = list(profiles) + ([f"{base.name}@probe"] if base else [])
    traces: dict = {}
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    records, lines = [], []
    head = f"{'file':<22} {'policy':<26} {'rep':>3} {'measured':>9}" + "".join(f" {h[:22]:>24}" for h in columns)
    lines += [f"# measured engine runs re-simulated on the CPU ({date}): predicted ms/token (error vs measured)"]
    if base:
        lines += [f"# {base.name}@probe: {base.name} with its flash scaled, per step, to that step's own O_DIRECT probes "
                  "(before and after its tokens): the disk's drift between minutes taken out"]
    lines += [head]
    errors: dict[str, list[float]] = {h: [] for h in columns}
    for path in args.results:
        for rec in load_records(path):
            factor = drift_factor(base, rec) if base else None
            pred = predict(rec, {**profiles, **({f"{base.name}@probe": at_probe(base, factor)} if factor else {})},
                           traces)
            cells = ""
            for h in columns:
                if h not in pred:
                    cells += f" {'-':>24}"
                    continue
                ms = pred[h]
                err = (ms - rec["latency_ms"]) / rec["latency_ms"] * 100
                errors[h].append(err)
                cells += f" {ms:14.1f} ({err:+5.1f}%)"
                records.append({"device": f"cpu (re-simulation of: {rec['device']})", "date": date,
                                "measured_date": rec["date"], "source": Path(path).name, "policy": rec["policy"],
                                "repeat": rec.get("repeat", 0), "hardware": h, "measured_ms": rec["latency_ms"],
                                "predicted_ms": round(ms, 3), "error_pct": round(err, 2),
                                "drift_factor": round(factor, 3) if h.endswith("@probe") else None})
            lines.append(f"{Path(path).name[:22]:<22} {rec['policy'][:26]:<26} {rec.get('repeat', 0):>3} "
                         f"{rec['latency_ms']:9.1f}{cells}")
    lines.append("")
    for h, e in errors.items():
        a = np.abs(e)
        if a.size:
            lines.append(f"{h}: |error| median {np.median(a):.1f}%, max {a.max():.1f}% over {a.size} measured runs")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out_dir) / "results"
    write_results(out / "resim_engine.json", records)
    atomic_write_text(out / "resim_engine.txt", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
