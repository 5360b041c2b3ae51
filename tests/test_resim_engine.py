"""benchmarks/resim_engine.py rebuilds a measured engine step's plans: its prediction equals the simulator's
on plans built directly, and a step removed from bench_engine is rebuilt from what its record says ran."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from resim_engine import predict  # noqa: E402
from sim.hardware import HardwareProfile  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.presets import load_preset  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.trace import SyntheticTraceConfig, Trace, generate_trace  # noqa: E402


def record(policy, **kw):
    return {"model": "opt-6.7b", "policy": policy, "memory_budget": 0.5, "warmup": 1, "tokens": 2,
            "trace_tokens": 3, "trace_seed": 0, "latency_ms": 1.0, **kw}


def direct(pol: Policy) -> float:
    spec = ModelSpec.preset("opt-6.7b")
    trace = generate_trace(spec, SyntheticTraceConfig.from_preset(tokens=3, seed=0))
    plans = list(PolicyEngine(spec, pol).plan_trace(Trace(active=trace.active)))
    return simulate(spec, HW, pol, plans=plans).summary(1)["latency_ms"]


HW = HardwareProfile.from_dict(load_preset("hardware", "h100-vda"))


def test_prediction_is_the_simulators_on_the_same_plans():
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.5,
                            "reads_in_flight": 64, "eviction": "lfu"})
    got = predict(record("wb+lfu+depth64"), {"h": HW}, {})["h"]
    assert abs(got - direct(pol)) < 1e-9 * got
    assert abs(got - direct(Policy.from_dict({**pol.to_dict(), "reads_in_flight": 8}))) > 1e-3 * got   # it matters


def test_a_removed_step_is_rebuilt_from_its_record():
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.5,
                            "reads_in_flight": 64, "eviction": "lru"})
    got = predict(record("wb+since-removed", reads_in_flight=64, eviction="lru"), {"h": HW}, {})["h"]
    assert abs(got - direct(pol)) < 1e-9 * got


def test_a_warm_start_step_uses_the_traces_calibration_counts():
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.5,
                            "reads_in_flight": 64, "eviction": "frequency", "warm_start": True})
    spec = ModelSpec.preset("opt-6.7b")
    trace = generate_trace(spec, SyntheticTraceConfig.from_preset(tokens=3, seed=0, calibration_tokens=20))
    plans = list(PolicyEngine(spec, pol).plan_trace(trace))
    want = simulate(spec, HW, pol, plans=plans).summary(1)["latency_ms"]
    got = predict(record("wb+freq+warm+depth64", trace_calibration_tokens=20), {"h": HW}, {})["h"]
    assert abs(got - want) < 1e-9 * got


def test_drift_factor_scales_the_profile_to_the_steps_probes():
    from resim_engine import at_probe, drift_factor
    size, depth = 16 * 1024, 64
    table = float(HW.read_throughput_gbps(size, depth))
    rec = record("wb+lfu+depth64", reads_in_flight=depth, probe_gbps={"16KiB": 1.5 * table},
                 probe_after_gbps={"16KiB": 2.5 * table})
    f = drift_factor(HW, rec)
    assert abs(f - 2.0) < 1e-9                       # the mean of before and after, over the table
    scaled = at_probe(HW, f)
    assert abs(float(scaled.read_throughput_gbps(size, depth)) - 2 * table) < 1e-6 * table
    assert scaled.seq_gbps == 2 * HW.seq_gbps
    assert drift_factor(HW, record("naive")) is None  # no probes recorded: no column


def test_an_engine_point_is_timed_at_its_own_probes():
    """resim_engine --fit hands bench_engine records to experiments.calibrate_sim as points whose prediction
    scales any candidate profile to the record's own probes."""
    from resim_engine import EnginePoint, at_probe, drift_factor
    from experiments.calibrate_sim import Evaluator
    table = float(HW.read_throughput_gbps(16 * 1024, 64))
    rec = record("wb+lfu+depth64", reads_in_flight=64, eviction="lfu", probe_gbps={"16KiB": 0.5 * table})
    ev = Evaluator([EnginePoint(rec, 1.0)])
    got = ev(HW)[0]
    want = predict(rec, {"h": at_probe(HW, drift_factor(HW, rec))}, {})["h"]
    assert abs(got - want) < 1e-9 * want
    assert got > 1.2 * predict(rec, {"h": HW}, {})["h"]      # half the disk rate: clearly slower
    # read_scale cancels: the same disk as probed, whatever the profile's table says
    fast = HW.with_changes(read_gbps=(2 * np.asarray(HW.read_gbps)).tolist(), seq_gbps=2 * HW.seq_gbps)
    assert abs(ev(fast)[0] - got) < 1e-6 * got
