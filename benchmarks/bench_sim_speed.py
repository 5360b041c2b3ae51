"""How fast is the simulator itself? Times trace generation excluded: plan + simulate.

    python benchmarks/bench_sim_speed.py

Writes benchmarks/results/sim_speed.txt, sim_speed.png and sim_speed.json
(records {device, date, model, policy, tokens, layers, wall_s})."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from pathlib import Path

from _results import write_results
from sim.atomic import atomic_write_text
from sim.hardware import HardwareProfile
from sim.model_spec import ModelSpec
from sim.plan import PolicyEngine
from sim.policy import Policy
from sim.simulator import simulate
from sim.trace import SyntheticTraceConfig, generate_trace

HERE = Path(__file__).resolve().parent


def device_name() -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def time_run(spec: ModelSpec, policy: Policy, tokens: int, repeats: int = 3) -> float:
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=tokens))
    hw = HardwareProfile.preset("m1-max")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        simulate(spec, hw, policy, plans=PolicyEngine(spec, policy).plan_trace(trace))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    base = ModelSpec.preset("opt-6.7b")
    date = dt.date.today().isoformat()
    records = []
    points = [(p, 100, 32) for p in ("naive", "predictor", "windowing", "windowing_bundling")]
    points += [("windowing_bundling", t, 32) for t in (25, 50, 200)]
    points += [("windowing_bundling", 100, l) for l in (8, 16)]
    for policy_name, tokens, layers in points:
        spec = ModelSpec.from_dict({**base.to_dict(), "n_layers": layers})
        wall = time_run(spec, Policy.preset(policy_name), tokens)
        records.append({"device": device_name(), "date": date, "model": base.name, "policy": policy_name,
                        "tokens": tokens, "layers": layers, "wall_s": round(wall, 3)})
        print(f"{policy_name:20s} tokens={tokens:4d} layers={layers:3d}  {wall:6.2f} s", flush=True)

    write_results(HERE / "results" / "sim_speed.json", records)
    head = next(r for r in records if r["policy"] == "windowing_bundling" and r["tokens"] == 100 and r["layers"] == 32)
    lines = [f"Simulator speed ({records[0]['device']}, {date}); best of 3; plan + simulate, trace excluded",
             "", f"{'policy':20s} {'tokens':>6s} {'layers':>6s} {'wall_s':>7s} {'ms/token-layer':>15s}"]
    for r in records:
        lines.append(f"{r['policy']:20s} {r['tokens']:6d} {r['layers']:6d} {r['wall_s']:7.2f} "
                     f"{1e3 * r['wall_s'] / (r['tokens'] * r['layers']):15.3f}")
    lines += ["", f"HEADLINE: 100 tokens of OPT-6.7B (32 layers), windowing_bundling: {head['wall_s']:.2f} s (target <= 5 s)"]
    atomic_write_text(HERE / "results" / "sim_speed.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, fixed in ((axes[0], "tokens", ("layers", 32)), (axes[1], "layers", ("tokens", 100))):
        pts = sorted((r[key], r["wall_s"]) for r in records if r["policy"] == "windowing_bundling" and r[fixed[0]] == fixed[1])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel(key); ax.set_ylabel("simulator wall time (s)")
        ax.set_title(f"windowing_bundling, {fixed[0]}={fixed[1]}", fontsize=9)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "sim_speed.png", dpi=120)


if __name__ == "__main__":
    main()
