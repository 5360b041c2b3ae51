"""Cross-machine fidelity: software constants fitted on one GPU kind, hardware measured on another by a
quick calibration alone, engine runs on that other kind predicted and then measured.

    # 1. on the CPU: fit the engine's software constants on measured engine runs of one machine
    python benchmarks/bench_fidelity.py fit RESULTS.json... --hardware h100-calibrated \\
        --out conf/software/engine-h100.yaml
    # 2. on the other machine (GPU): quick calibration, then the points (backend=both semantics)
    python -m real.calibrate /root/flash --quick --name h200-quick
    python benchmarks/bench_fidelity.py run --hardware h200-quick --software engine-h100 --flash-dir /root/flash
    # 3. anywhere: the summary (also written by ``run``)
    python benchmarks/bench_fidelity.py report benchmarks/validation/fidelity/points-h100.json

``run`` executes the points below (two model geometries; policies, windows, chunk sizes, sparsities and
memory budgets), each through the engine of bench_engine.py (O_DIRECT loader, neuron cache, kernels), with
an O_DIRECT probe through the same loader just before and just after its tokens: the disk's speed moves by
tens of percent within the hour. Each point is predicted twice: with the profile as calibrated (hardware from
the quick calibration + software fitted elsewhere), and with that profile's flash scaled to the point's own
probes. Writes results/fidelity.md, results/fidelity.json (one summary record per fit/predict pair) and
validation/fidelity/points-<run>.json (every point; a run is named after the GPU kind unless --run names it) under --out-dir."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from _results import load_records, write_results  # noqa: E402
from resim_engine import EnginePoint, at_probe, drift_factor  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from sim.hardware import HardwareProfile  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.presets import CONF_DIR, load_preset  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.software import SoftwareProfile  # noqa: E402
from sim.trace import SyntheticTraceConfig, generate_trace  # noqa: E402

# (label, model, policy preset, policy overrides, trace sparsity, measured tokens). Warm-up: 5 tokens (1 for naive).
# Cheap points first (a run cut by --time-limit keeps the most points); the unbundled and naive ones last.
POINTS = [
    ("opt/wb", "opt-6.7b", "windowing_bundling", {}, 0.97, 16),
    ("opt/wb-k2", "opt-6.7b", "windowing_bundling", {"window": 2}, 0.97, 16),
    ("opt/wb-k8", "opt-6.7b", "windowing_bundling", {"window": 8}, 0.97, 16),
    ("opt/wb-c16", "opt-6.7b", "windowing_bundling", {"chunk_kib": 16}, 0.97, 16),
    ("opt/wb-c128", "opt-6.7b", "windowing_bundling", {"chunk_kib": 128}, 0.97, 16),
    ("opt/wb-s95", "opt-6.7b", "windowing_bundling", {}, 0.95, 16),
    ("opt/wb-s99", "opt-6.7b", "windowing_bundling", {}, 0.99, 16),
    ("opt/wb-m0.4", "opt-6.7b", "windowing_bundling", {"memory_budget": 0.4}, 0.97, 16),
    ("opt/wb-lfu-m0.8", "opt-6.7b", "windowing_bundling", {"memory_budget": 0.8, "eviction": "lfu"}, 0.97, 16),
    ("opt/wb-d64-lfu", "opt-6.7b", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu"}, 0.97, 16),
    ("llama/wb", "llama-2-7b", "windowing_bundling", {}, 0.97, 16),
    ("llama/wb-k2", "llama-2-7b", "windowing_bundling", {"window": 2}, 0.97, 16),
    ("llama/wb-s95", "llama-2-7b", "windowing_bundling", {}, 0.95, 16),
    ("llama/wb-lfu-m0.8", "llama-2-7b", "windowing_bundling", {"memory_budget": 0.8, "eviction": "lfu"}, 0.97, 16),
    ("llama/wb-c16-d64", "llama-2-7b", "windowing_bundling", {"chunk_kib": 16, "reads_in_flight": 64}, 0.97, 16),
    ("opt/predictor", "opt-6.7b", "predictor", {}, 0.97, 6),
    ("opt/windowing", "opt-6.7b", "windowing", {}, 0.97, 6),
    ("opt/naive", "opt-6.7b", "naive", {}, 0.97, 2),
    ("llama/naive", "llama-2-7b", "naive", {}, 0.97, 1),
]
WARMUP = 5
# the synthetic trace's other knobs, pinned here (not read from a preset) so that a point measured today is
# re-planned identically by ``report`` later, whatever the presets become
TRACE_KNOBS = {"seed": 0, "reuse": 0.05, "rate_skew": 0.5, "coactivation": 0.0, "cluster_size": 8,
               "predictor_recall": 1.0, "predictor_fp": 0.0, "calibration_tokens": 0}
DTYPE = "float16"


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def load_hardware(name_or_path: str) -> HardwareProfile:
    p = Path(name_or_path)
    return HardwareProfile.from_yaml(p) if p.suffix in (".yaml", ".yml") and p.exists() else \
        HardwareProfile.from_dict(load_preset("hardware", name_or_path))


SMOKE_MODEL = None      # run --smoke: every point on a small geometry (a CPU check of the whole path)


_TRACES: dict = {}      # generated traces by (model, sparsity): the same for every point, fit and report


def point_spec_policy(point) -> tuple[ModelSpec, Policy]:
    """The model geometry and the policy of one point."""
    _, model, preset, over, _, _ = point
    spec = ModelSpec.from_dict({**load_preset("model", SMOKE_MODEL or model), "dtype": DTYPE})
    return spec, Policy.from_dict({**Policy.preset(preset).to_dict(), "memory_budget": 0.5, **over})


def point_setup(point):
    """The spec, policy, plans and warm-up of one point (torch-free: the same on the CPU and the device)."""
    label, model, preset, over, sparsity, tokens = point
    model = SMOKE_MODEL or model
    spec, pol = point_spec_policy(point)
    warm = 1 if not pol.sparse else WARMUP
    key = (model, sparsity)
    if key not in _TRACES:
        need = WARMUP + max(p[5] for p in POINTS)
        _TRACES[key] = generate_trace(spec, SyntheticTraceConfig(tokens=need, sparsity=sparsity, **TRACE_KNOBS))
    plans = list(PolicyEngine(spec, pol).plan_trace(_TRACES[key].first(warm + tokens)))
    return spec, pol, plans, warm


def predict(spec, pol, plans, warm, hw: HardwareProfile) -> float:
    return simulate(spec, hw, pol, plans=plans).summary(warm)["latency_ms"]


# ---- fit (CPU) -----------------------------------------------------------------------------------
FIT_PARAMS = ("io_overhead_us", "op_overhead_us", "row_op_us", "compute_gbps")


class _PointAtProbe:
    """A measured fidelity point, re-timed on any profile scaled to the point's own disk probes."""

    def __init__(self, rec: dict):
        self.rec = rec
        self.setup = point_setup({p[0]: p for p in POINTS}[rec["point"]])

    def predict(self, hw: HardwareProfile) -> float:
        return predict(*self.setup, at_probe(hw, drift_factor(hw, self.rec)))




class FidelityPoint:
    """A record of ``run`` as a point for experiments.calibrate_sim.fit (so either machine can be the fit one)."""

    def __init__(self, rec: dict):
        self.rec, self.measured_ms, self.label = rec, float(rec["latency_ms"]), rec["point"]

    def prepare(self) -> _PointAtProbe:
        return _PointAtProbe(self.rec)


def cmd_fit(args) -> int:
    """Fit the software constants on measured bench_engine steps of one machine, each step timed at its own
    probes (so the disk's drift, a hardware matter, does not leak into them); whole steps held out."""
    from experiments.calibrate_sim import fit, format_report

    base = load_hardware(args.hardware)
    recs = [rec for p in args.results for rec in load_records(p) if rec.get("probe_gbps")]
    if not recs:
        raise SystemExit("no record with probe_gbps in RESULTS. Fix: give bench_engine.py results files")
    points = [FidelityPoint(rec) if "point" in rec else EnginePoint(rec, float(rec["latency_ms"]), rec["policy"])
              for rec in recs]
    cal = fit(points, base, params=FIT_PARAMS, overlap="keep", seed=args.seed, name=Path(args.out).stem,
              jobs=args.jobs, max_evals=args.max_evals, groups=[p.label for p in points])
    v = cal.report["values"]
    held = cal.report["heldout_after"]
    devices = sorted({r["device"] for r in recs})
    dates = sorted({str(r["date"])[:10] for r in recs})
    data = ", ".join(f"{Path(p).parent.name}/{Path(p).name}" for p in args.results)
    what = (f"fitted by benchmarks/bench_fidelity.py fit on {cal.fit_idx.size} of {len(points)} bench_engine steps "
            f"({data}; {', '.join(devices)}, {', '.join(dates)}), each at its own disk probes, hardware "
            f"{base.name}; held-out steps ({cal.heldout_idx.size}) median |err| {held['median_abs_err_pct']:.1f}%, "
            f"max {held['max_abs_err_pct']:.1f}%")
    sw = SoftwareProfile(
        name=Path(args.out).stem, op_overhead_us=round(v["op_overhead_us"], 4),
        io_overhead_us=round(v["io_overhead_us"], 4), row_op_us=round(v["row_op_us"], 6),
        overlap=bool(cal.report["overlap"]), compute_efficiency=round(v["compute_gbps"] / base.compute_gbps, 6),
        read_efficiency=1.0, fit_device=", ".join(devices), source=what,
        sources={"op_overhead_us": what, "io_overhead_us": what, "row_op_us": what,
                 "overlap": "the engine overlaps reads with compute over resident rows (real/engine.py); kept",
                 "compute_efficiency": f"{what}: fitted compute_gbps {v['compute_gbps']:.4g} / {base.name}'s measured "
                                       f"{base.compute_gbps:.4g} GB/s",
                 "read_efficiency": "not fitted (1.0): a calibration on the day measures the disk as the engine "
                                    "reads it within a few percent (DESIGN.md, 2026-12-06); drift is handled by probes"})
    sw.to_yaml(args.out, header=f"# Engine software constants: {what}.\n")
    print(format_report(cal.report))
    print(f"wrote {args.out}")
    return 0


def cmd_fit_read(args) -> int:
    """Fit ``read_efficiency``: how much faster the engine's loader reads than the quick calibration's probe
    said, on the fit machine. Each measured point carries O_DIRECT probes through the loader just before and
    after its tokens; the median over points of (those probes / the calibrated table at the same size and
    depth) is the loader's read rate over the probe's. Fitted on one machine's points (calibrated minutes
    before them), carried to machines that were only calibrated."""
    import dataclasses

    import yaml

    records = json.loads(Path(args.points).read_text())
    path = Path(args.software)
    if path.suffix in (".yaml", ".yml") and path.exists():
        sw = SoftwareProfile.from_dict(yaml.safe_load(path.read_text()))
    else:                        # a preset name (SoftwareProfile.preset names the fix if there is none)
        sw, path = SoftwareProfile.preset(args.software), CONF_DIR / "software" / f"{args.software}.yaml"
    hw = load_hardware(records[0]["hardware"])
    if hw.read_probe == "loader":
        raise SystemExit(f"{records[0]['hardware']}: its flash table was read through the engine's loader, so there "
                         "is no loader/probe ratio to fit (read_efficiency is not applied to such a table). Fix: fit on "
                         "points predicted with a `real.calibrate --reader threads` profile")
    base = dataclasses.replace(sw, read_efficiency=1.0).apply(hw)
    ratios = [f for f in (drift_factor(base, r) for r in records) if f]
    if not ratios:
        raise SystemExit(f"{args.points}: no point has probes. Fix: give a points.json written by `run`")
    eff = float(np.median(ratios))
    what = (f"median over {len(ratios)} points of the engine loader's O_DIRECT probes / {records[0]['hardware']}'s "
            f"table at the same size and depth (bench_fidelity.py fit-read on {Path(args.points).name}; "
            f"{records[0]['device']}, {str(records[0]['date'])[:10]}; quartiles "
            f"{np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f})")
    new = dataclasses.replace(sw, read_efficiency=round(eff, 4), sources={**sw.sources, "read_efficiency": what})
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    new.to_yaml(path, header=header)
    print(f"read_efficiency {eff:.4f}: {what}\nwrote {path}")
    return 0


# ---- run (GPU) -----------------------------------------------------------------------------------
def cmd_run(args) -> int:
    import torch
    from bench_engine import SyntheticBody, drop_page_cache, ensure_flash, run_between_probes, warm_kernels
    from real.engine import FlashFFN
    from sim.simulator import SimResult

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    hw = load_hardware(args.hardware)
    sw = SoftwareProfile.preset(args.software)
    predicted_hw = sw.apply(hw)
    chosen = [p for p in POINTS if not args.points or p[0] in args.points.split(",")]
    flash, bodies, records = {}, {}, []
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    notes = [f"page cache: {drop_page_cache()}"]
    out = Path(args.out_dir)
    for point in chosen:
        if time.perf_counter() - t_start > args.time_limit:
            log(f"time limit: skipping {point[0]}")
            continue
        label = point[0]
        spec, pol, plans, warm = point_setup(point)
        try:
            if (spec.name, pol.bundling) not in flash:
                d, secs = ensure_flash(spec, Path(args.flash_dir), pol.bundling, device)
                flash[(spec.name, pol.bundling)] = d
                log(f"flash dir {d.root} ({'written in %.1f s' % secs if secs else 'reused'})")
            if spec.name not in bodies:
                if device.type == "cuda":
                    notes.append(f"{spec.name} kernel warm-up {warm_kernels(spec, device, 'auto'):.1f} s")
                bodies[spec.name] = SyntheticBody(spec, device, max_tokens=WARMUP + 32, predictor_rank=128, seed=0)
            ffn = FlashFFN(flash[(spec.name, pol.bundling)], PolicyEngine(spec, pol).capacity,
                           strategy=pol.mem_strategy, device=device, threads=pol.reads_in_flight)
            try:
                costs, wall, (bound_before, probe_before), (bound_after, probe_after) = \
                    run_between_probes(bodies[spec.name], ffn, pol, plans, warm)
            finally:
                ffn.close()
        except Exception as e:  # noqa: BLE001 -- report and go on with the other points
            traceback.print_exc()
            log(f"{label}: FAILED ({type(e).__name__}: {e})")
            continue
        real = SimResult(tokens=costs).summary(warm)
        rec = {"device": dev_name, "date": date, "point": label, "model": spec.name, "policy": pol.name,
               "window": pol.window, "bundling": pol.bundling, "chunk_kib": pol.chunk_kib,
               "memory_budget": pol.memory_budget, "reads_in_flight": pol.reads_in_flight, "eviction": pol.eviction,
               "sparsity": point[4], "trace_knobs": json.dumps(TRACE_KNOBS, sort_keys=True), "tokens": int(real["measured_tokens"]), "warmup": warm,
               "latency_ms": round(real["latency_ms"], 3), "io_ms": round(real["io_ms"], 3),
               "mem_ms": round(real["mem_ms"], 3), "compute_ms": round(real["compute_ms"], 3),
               "bytes_per_token": int(real["bytes_per_token"]), "reads_per_token": round(real["reads_per_token"], 1),
               "io_lower_bound_ms": round((bound_before + bound_after) / 2 * 1e3, 3),
               "probe_gbps": probe_before, "probe_after_gbps": probe_after, "hardware": hw.name,
               "software": sw.name, "fit_device": sw.fit_device, "run": args.run or device_slug(dev_name),
               "wall_s": round(wall, 1)}
        add_predictions([rec], predicted_hw)
        records.append(rec)
        log(f"{label}: {rec['latency_ms']:.1f} ms/token (io {rec['io_ms']:.1f}), probes {probe_before} -> {probe_after}")
        write_report(records, predicted_hw, out, notes)
    write_report(records, predicted_hw, out, notes, final=True)
    log(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def cmd_prepare(args) -> int:
    """Write every point's flash files (34 GB on a GPU) and stop: a device run writes them before its quick
    calibration, so the calibration sees the disk after a minute of work, as the points do (a freshly started VM's
    disk read 1.1-1.8x faster during the points than in a calibration taken right after boot; whether the disk's
    first minutes are the cause is what this order tests: docs/fidelity.md)."""
    import torch
    from bench_engine import ensure_flash

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = {}
    for point in POINTS:
        spec, pol = point_spec_policy(point)
        wanted[(spec.name, pol.bundling)] = spec
    for (name, bundled), spec in wanted.items():
        d, secs = ensure_flash(spec, Path(args.flash_dir), bundled, device)
        log(f"flash dir {d.root} ({'written in %.1f s' % secs if secs else 'reused'})")
    return 0


# ---- report --------------------------------------------------------------------------------------
def add_predictions(records: list[dict], hw: HardwareProfile) -> None:
    """sim_ms (the profile as calibrated) and sim_probed_ms (its flash scaled to the point's probes)."""
    by_label = {p[0]: p for p in POINTS}
    for rec in records:
        spec, pol, plans, warm = point_setup(by_label[rec["point"]])
        sim = predict(spec, pol, plans, warm, hw)
        f = drift_factor(hw, rec)
        probed = predict(spec, pol, plans, warm, at_probe(hw, f)) if f else None
        m = rec["latency_ms"]
        rec.update(sim_hardware=hw.name, sim_ms=round(sim, 3), err_pct=round((sim - m) / m * 100, 2),
                   drift_factor=round(f, 3) if f else None, sim_probed_ms=round(probed, 3) if probed else None,
                   err_probed_pct=round((probed - m) / m * 100, 2) if probed else None)


def summary(records: list[dict], hw: HardwareProfile) -> dict:
    sw = SoftwareProfile.preset(records[0]["software"])
    err = np.abs([r["err_pct"] for r in records])
    probed = np.abs([r["err_probed_pct"] for r in records if r["err_probed_pct"] is not None])
    return {"device": records[0]["device"], "date": records[0]["date"], "fit_device": records[0]["fit_device"],
            "predict_device": records[0]["device"], "run": run_name(records[0]), "hardware": records[0]["hardware"],
            "software": records[0]["software"], "sim_hardware": hw.name, "points": len(records),
            "models": ",".join(sorted({r["model"] for r in records})),
            "median_abs_err_pct": round(float(np.median(err)), 2), "max_abs_err_pct": round(float(err.max()), 2),
            "median_abs_err_pct_probed": round(float(np.median(probed)), 2) if probed.size else None,
            "max_abs_err_pct_probed": round(float(probed.max()), 2) if probed.size else None,
            "mean_err_pct": round(float(np.mean([r["err_pct"] for r in records])), 2),
            **read_side(hw, sw),
            # true where read_efficiency was fitted on these very points: the as-calibrated error is then in-sample
            "read_efficiency_in_sample": f"points-{run_name(records[0])}.json" in
                                         sw.sources.get("read_efficiency", "")}


def read_side(hw: HardwareProfile, sw: SoftwareProfile) -> dict:
    """Which reader measured the flash table, and the loader/probe ratio the prediction applied to it (none to a
    table read through the loader: sim.software)."""
    return {"read_probe": hw.read_probe, "read_efficiency": sw.factors(hw)["read_efficiency"]}


def device_slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': one points file and one table per measured GPU kind."""
    for kind in ("H200", "H100", "A100", "L40S", "L4"):
        if kind in device:
            return kind.lower()
    return "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-") or "cpu"


def run_name(rec: dict) -> str:
    """A measured run's name: its points file, its table and its row in fidelity.json. The GPU kind by default;
    a second run on the same kind (a fresh VM with its own disk) names itself, so it adds a row, not replaces one."""
    return rec.get("run") or device_slug(rec.get("predict_device") or rec["device"])


def write_report(records: list[dict], hw: HardwareProfile, out: Path, notes: list[str], final: bool = False) -> None:
    """validation/fidelity/points-<run>.json and results/fidelity-<run>.md for this run; results/fidelity.json
    keeps one summary record per run (this one replaced) and results/fidelity.md tabulates them."""
    if not records:
        return
    slug = run_name(records[0])
    atomic_write_text(out / "validation" / "fidelity" / f"points-{slug}.json", json.dumps(records, indent=1) + "\n")
    s = summary(records, hw)
    res = out / "results" / "fidelity.json"
    others = [r for r in (load_records(res) if res.exists() else []) if run_name(r) != s["run"]]
    write_results(res, [*others, s])
    lines = [f"# Cross-machine fidelity, run `{slug}`: measured on {s['predict_device']} ({s['date']}), software constants fitted "
             f"on {s['fit_device']}",
             "", f"Predicted with `{hw.name}`: hardware `{s['hardware']}` (a quick calibration of the measured machine) + "
                 f"software `{s['software']}` (fitted on engine runs of {s['fit_device']}). `probed`: the same profile "
                 "with its flash scaled to the point's own O_DIRECT probes (just before and after its tokens).",
             "", f"**{s['points']} points: median |error| {s['median_abs_err_pct']:.1f}% (max {s['max_abs_err_pct']:.1f}%) "
                 f"as calibrated; {s['median_abs_err_pct_probed']}% (max {s['max_abs_err_pct_probed']}%) with the "
                 "per-point probes.**", "",
             "| point | measured ms | predicted ms | error % | probed ms | error % | drift | MB/token | probes GB/s before -> after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        pr = "; ".join(f"{k} {v} -> {r['probe_after_gbps'].get(k)}" for k, v in r["probe_gbps"].items())
        lines.append(f"| {r['point']} | {r['latency_ms']:.1f} | {r['sim_ms']:.1f} | {r['err_pct']:+.1f} | "
                     f"{r['sim_probed_ms'] or float('nan'):.1f} | {r['err_probed_pct'] if r['err_probed_pct'] is not None else '-'} | "
                     f"{r['drift_factor']} | {r['bytes_per_token'] / 1e6:.1f} | {pr} |")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    atomic_write_text(out / "results" / f"fidelity-{slug}.md", "\n".join(lines) + "\n")
    write_index(out)
    if final:
        print("\n".join(lines), flush=True)


def write_index(out: Path) -> None:
    """results/fidelity.md: one row per run in results/fidelity.json."""
    res = out / "results" / "fidelity.json"
    index = ["# Cross-machine fidelity: one row per run (a machine kind, or a second VM of one)", "",
             "Software constants fitted on one machine's engine runs; hardware from the measured machine's quick "
             "calibration alone (`docs/fidelity.md`). Per-point tables: `fidelity-<run>.md`. `read eff.`: the "
             "software's loader-over-probe read rate as applied; `in-sample` where it was fitted on that row's own points "
             "(its as-calibrated error is then not a prediction); none is applied to a table the calibration read "
             "through the engine's loader.", "",
             "| run | measured on | date | fitted on | hardware | software | points | median abs err % | max % | "
             "median abs err % (probed) | max % (probed) | read eff. |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in load_records(res):
        index.append(f"| {run_name(r)} | {r['predict_device']} | {str(r['date'])[:16]} | {r['fit_device']} | {r['hardware']} | "
                     f"{r['sim_hardware']} | {r['points']} | {r['median_abs_err_pct']} | {r['max_abs_err_pct']} | "
                     f"{r['median_abs_err_pct_probed']} | {r['max_abs_err_pct_probed']} | {r.get('read_efficiency')}"
                     f"{' (in-sample)' if r.get('read_efficiency_in_sample') else ''}"
                     f"{' (loader-read table)' if r.get('read_probe') == 'loader' else ''} |")
    atomic_write_text(out / "results" / "fidelity.md", "\n".join(index) + "\n")


def cmd_report(args) -> int:
    records = json.loads(Path(args.points).read_text())
    hw = SoftwareProfile.preset(records[0]["software"]).apply(load_hardware(args.hardware or records[0]["hardware"]))
    add_predictions(records, hw)
    write_report(records, hw, Path(args.out_dir), [], final=True)
    return 0


def cmd_merge(args) -> int:
    """Add the summary records of a fidelity.json written elsewhere (a device run whose points file did not come
    back) to results/fidelity.json, replacing rows of the same run, and rewrite the index."""
    res = Path(args.out_dir) / "results" / "fidelity.json"
    new = load_records(Path(args.summary))
    for r in new:            # records written before summaries said which reader measured the table
        if r.get("read_probe") is None:
            r.update(read_side(load_hardware(r["hardware"]), SoftwareProfile.preset(r["software"])))
    runs = {run_name(r) for r in new}
    kept = [r for r in (load_records(res) if res.exists() else []) if run_name(r) not in runs]
    write_results(res, [*kept, *new])
    write_index(Path(args.out_dir))
    print(f"merged runs {sorted(runs)} into {res}")
    return 0


def cmd_dry(args) -> int:
    """Plan and predict every point on the CPU (no engine): checks the points are valid and shows the sizes."""
    hw = SoftwareProfile.preset(args.software).apply(load_hardware(args.hardware))
    for p in POINTS:
        spec, pol, plans, warm = point_setup(p)
        print(f"{p[0]:<20} {predict(spec, pol, plans, warm, hw):9.1f} ms/token predicted on {hw.name}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit software constants on bench_engine results (CPU)")
    f.add_argument("results", nargs="+")
    f.add_argument("--hardware", default="h100-calibrated", help="the fit machine's measured hardware profile")
    f.add_argument("--out", default=str(ROOT / "conf" / "software" / "engine-h100.yaml"))
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jobs", type=int, default=2)
    f.add_argument("--max-evals", type=int, default=120)
    fr = sub.add_parser("fit-read", help="fit read_efficiency on the fit machine's measured points (CPU)")
    fr.add_argument("points")
    fr.add_argument("--software", default="engine-h100", help="name or YAML path; rewritten in place")
    r = sub.add_parser("run", help="measure the points on this machine (GPU) and predict them")
    r.add_argument("--hardware", required=True, help="this machine's quick calibration (name or YAML path)")
    r.add_argument("--software", default="engine-h100")
    r.add_argument("--flash-dir", default="/root/flash")
    r.add_argument("--points", default="", help="comma-separated labels (default: all)")
    r.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    r.add_argument("--time-limit", type=float, default=420.0)
    r.add_argument("--run", default="", help="this run's name (default: the GPU kind, e.g. h200); name a second run on "
                                             "one kind, e.g. h100-heldout, to keep the first one's row")
    p = sub.add_parser("report", help="re-predict measured points (e.g. with another profile) and rewrite the report")
    p.add_argument("points")
    p.add_argument("--hardware", default=None)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    pr = sub.add_parser("prepare", help="write every point's flash files and stop (before a quick calibration)")
    pr.add_argument("--flash-dir", default="/root/flash")
    pr.add_argument("--smoke", default=None, metavar="MODEL", help="write them for this small model (CPU check)")
    m = sub.add_parser("merge", help="add a device run's summary records (fidelity.json) to the results")
    m.add_argument("summary")
    m.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    d = sub.add_parser("dry", help="plan and predict the points on the CPU")
    d.add_argument("--hardware", default="h100-calibrated")
    d.add_argument("--software", default="engine-h100")
    r.add_argument("--smoke", default=None, metavar="MODEL", help="run every point on this small model (CPU check)")
    args = ap.parse_args(argv)
    global SMOKE_MODEL
    SMOKE_MODEL = getattr(args, "smoke", None)
    return {"fit": cmd_fit, "fit-read": cmd_fit_read, "run": cmd_run, "prepare": cmd_prepare, "report": cmd_report, "merge": cmd_merge,
            "dry": cmd_dry}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
