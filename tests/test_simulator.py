"""Simulator sanity: the timing model responds to hardware the way physics says it should."""

import numpy as np
import pytest

from sim.hardware import HardwareProfile
from sim.model_spec import ModelSpec
from sim.plan import PolicyEngine
from sim.policy import Policy
from sim.simulator import simulate
from sim.trace import SyntheticTraceConfig, generate_trace

SPEC = ModelSpec(name="s", n_layers=4, d_model=1024, d_ff=4096, n_heads=8, vocab=1000, dtype="float16")


@pytest.fixture(scope="module")
def trace():
    return generate_trace(SPEC, SyntheticTraceConfig(tokens=20, seed=3))


def scaled(hw: HardwareProfile, factor: float) -> HardwareProfile:
    return hw.with_changes(read_gbps=[[v * factor for v in row] for row in hw.read_gbps],
                           seq_gbps=hw.seq_gbps * factor, io_overhead_us=hw.io_overhead_us / factor)


def run(hw, policy, trace):
    return simulate(SPEC, hw, policy, trace).summary(warmup=3)


def test_infinite_flash_makes_token_compute_bound(trace):
    hw = scaled(HardwareProfile.preset("h100-vda"), 1e6).with_changes(h2d_gbps=0.0)  # no copy to a device
    s = run(hw, Policy.preset("windowing_bundling"), trace)
    assert s["io_ms"] < 1e-3 * s["latency_ms"]
    assert s["latency_ms"] == pytest.approx(s["compute_ms"] + s["mem_ms"], rel=0.01)


def test_doubling_bandwidth_roughly_halves_io_bound_token(trace):
    hw = HardwareProfile.preset("h100-vda")
    pol = Policy.preset("naive")
    base, fast = run(hw, pol, trace), run(scaled(hw, 2.0), pol, trace)
    assert base["io_ms"] > 0.9 * base["latency_ms"], "the naive token should be I/O bound here"
    assert fast["latency_ms"] / base["latency_ms"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("size_kib", [4, 8, 16, 32])
def test_more_reads_in_flight_never_slows_small_reads(trace, size_kib):
    hw = HardwareProfile.preset("h100-vda")
    spec_lat = []
    for depth in (1, 2, 4, 8, 16, 32, 64, 128):
        sizes = np.full(200, size_kib * 1024)
        spec_lat.append(hw.read_batch_seconds(sizes, depth))
    assert all(b <= a + 1e-12 for a, b in zip(spec_lat, spec_lat[1:]))
    lat = [run(hw, Policy(window=2, reads_in_flight=q), trace)["latency_ms"] for q in (1, 4, 16, 64)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lat, lat[1:]))


def test_batch_model_agrees_with_per_read_processes(trace):
    """One event per read batch vs one SimPy process per read: same I/O time within 10%."""
    hw = HardwareProfile.preset("h100-vda")
    pol = Policy(window=3, reads_in_flight=16)
    a = simulate(SPEC, hw, pol, trace, granularity="batch").summary(3)
    b = simulate(SPEC, hw, pol, trace, granularity="read").summary(3)
    assert a["io_ms"] == pytest.approx(b["io_ms"], rel=0.10)


def test_batch_model_agrees_with_per_read_processes_on_small_batches():
    """A handful of reads per layer (fewer than reads_in_flight): both models run them at their own depth."""
    tiny = generate_trace(SPEC, SyntheticTraceConfig(tokens=20, sparsity=0.999, seed=5))
    hw = HardwareProfile.preset("h100-vda")
    pol = Policy(window=1, reads_in_flight=32)
    a = simulate(SPEC, hw, pol, tiny, granularity="batch").summary(3)
    b = simulate(SPEC, hw, pol, tiny, granularity="read").summary(3)
    assert 0 < a["reads_per_token"] / SPEC.n_layers < 8
    assert a["io_ms"] == pytest.approx(b["io_ms"], rel=0.10)


def test_breakdown_and_counts_are_consistent(trace):
    hw = HardwareProfile.preset("m1-max")
    pol = Policy.preset("windowing_bundling")
    plans = list(PolicyEngine(SPEC, pol).plan_trace(trace))
    res = simulate(SPEC, hw, pol, plans=plans, record_timeline=True)
    for tc, token in zip(res.tokens, plans):
        assert tc.bytes == sum(lp.bytes for lp in token)
        assert tc.reads == sum(lp.n_reads for lp in token)
        # overlap can hide I/O, never invent time
        assert tc.latency_s <= tc.io_s + tc.mem_s + tc.compute_s + 1e-9
        assert tc.latency_s >= tc.compute_s + tc.mem_s - 1e-9
    kinds = {e.kind for e in res.timeline}
    assert {"attention", "predictor", "read", "evict", "insert", "ffn_new"} <= kinds


def test_windowing_bundling_beats_naive_on_paper_cpu_setting():
    """The quick-start claim, on fewer tokens: at least the paper's 4x CPU headline. The m1-max profile comes from
    public specifications now (issue 26), not tuned to the paper's figures, so the ratio itself is an outcome:
    experiments.paper_comparison reports it beside the paper's."""
    spec = ModelSpec.from_dict({**ModelSpec.preset("opt-6.7b").to_dict(), "dtype": "float32"})
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=25, reuse=0.05, rate_skew=0.5))
    hw = HardwareProfile.preset("m1-max")
    naive = simulate(spec, hw, Policy.preset("naive"), trace).summary(5)["latency_ms"]
    best = simulate(spec, hw, Policy.preset("windowing_bundling"), trace).summary(5)["latency_ms"]
    assert naive / best >= 4.0
