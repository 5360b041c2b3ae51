"""Look-ahead reads and read coalescing in the policy engine, the trace format and the simulator (torch-free;
docs/lookahead.md). The engine side and the small model's exactness: tests/test_lookahead_engine.py."""

import dataclasses

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.hardware import HardwareProfile
from sim.layout import neuron_runs
from sim.model_spec import ModelSpec
from sim.plan import PolicyEngine, bridge_gaps, ffn_cache_neurons
from sim.policy import Policy
from sim.simulator import simulate
from sim.trace import SyntheticTraceConfig, Trace, generate_trace
from sim.trace_fit import fit_lookahead
from sim.trace_stats import lookahead_shares

SPEC = ModelSpec.preset("opt-small")
KNOBS = dict(sparsity=0.9, reuse=0.3, rate_skew=1.0, predictor_recall=0.95, predictor_fp=0.4,
             lookahead_recall=0.8, lookahead_fp=0.3, lookahead_fp_skew=1.5, lookahead_recall_skew=0.4)


def policy(**kw) -> Policy:
    return dataclasses.replace(Policy.preset("windowing_bundling"), **{"memory_budget": 0.6, **kw})


def trace(tokens=24, seed=0, **kw) -> Trace:
    return generate_trace(SPEC, SyntheticTraceConfig(tokens=tokens, seed=seed, **{**KNOBS, **kw}))


@pytest.mark.parametrize("bad, match", [({"lookahead": 2}, "deeper look-ahead"), ({"lookahead": True}, "one of"),
                                        ({"lookahead": 1, "sparse": False}, "sparse policy"),
                                        ({"coalesce_gap": -1}, "integer >= 0")])
def test_policy_knobs_are_checked(bad, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(Policy(), **bad)


def test_default_knobs_leave_traces_unchanged_and_the_format_keeps_lookahead(tmp_path):
    plain = generate_trace(SPEC, SyntheticTraceConfig(tokens=16, seed=2, **{k: v for k, v in KNOBS.items()
                                                                            if not k.startswith("lookahead")}))
    la = trace(16, seed=2)
    assert plain.lookahead is None and la.lookahead is not None
    assert np.array_equal(plain.active, la.active) and np.array_equal(plain.predicted, la.predicted)
    assert not la.lookahead[:, 0].any(), "layer 0 has no layer before it"
    back = Trace.load(la.save(tmp_path / "t.npz"))
    assert np.array_equal(back.lookahead, la.lookahead) and np.array_equal(back.first(5).lookahead, la.lookahead[:5])
    with pytest.raises(ConfigError, match="lookahead_recall is 0"):
        SyntheticTraceConfig(lookahead_fp=0.2)
    with pytest.raises(ConfigError, match="shaped like active"):
        Trace(active=la.active, lookahead=la.lookahead[:3])


def test_generated_lookahead_has_its_knobs():
    s = lookahead_shares(trace(200).read_sets, trace(200).lookahead)
    assert s["recall"] == pytest.approx(KNOBS["lookahead_recall"], abs=0.02)
    assert s["fp"] == pytest.approx(KNOBS["lookahead_fp"], abs=0.03)


@pytest.mark.parametrize("on_base", [True, False])
def test_fit_lookahead_recovers_the_knobs(on_base):
    spec = dataclasses.replace(SPEC, n_layers=3)
    cfg = SyntheticTraceConfig(tokens=400, seed=4, **KNOBS)
    base = SyntheticTraceConfig(**{k: v for k, v in KNOBS.items() if not k.startswith("lookahead")})
    fit = fit_lookahead(generate_trace(spec, cfg), base if on_base else None, spec, max_tokens=400, seed=9)
    assert fit["lookahead_recall"] == pytest.approx(KNOBS["lookahead_recall"], abs=0.03)
    assert fit["lookahead_fp"] == pytest.approx(KNOBS["lookahead_fp"], abs=0.03)
    assert fit["lookahead_fp_skew"] == pytest.approx(KNOBS["lookahead_fp_skew"], abs=0.5)
    for share in ("extras_outside_window", "cold_recall", "new_recall"):   # the recall skew is weakly identified: its
        assert fit["synthetic"][share] == pytest.approx(fit["recorded"][share], abs=0.02)   # share is what must match


def covered(reads) -> np.ndarray:
    ids = [np.arange(s, s + c) for s, c in zip(reads.neuron_start, reads.neuron_count)]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


@pytest.mark.parametrize("kw", [{}, {"eviction": "frequency"}, {"eviction": "lfu", "window": 2},
                                {"eviction": "lru", "coalesce_gap": 2, "chunk_kib": 64}, {"window": 0},
                                {"coalesce_gap": 3, "chunk_kib": 32, "bundling": False}])
def test_lookahead_plans_read_early_what_is_flagged_and_late_the_rest(kw):
    pol = policy(lookahead=1, **kw)
    t = trace(20)
    eng = PolicyEngine(SPEC, pol)
    assert eng.capacity == ffn_cache_neurons(SPEC, pol) < ffn_cache_neurons(SPEC, dataclasses.replace(pol, lookahead=0)), \
        "the look-ahead predictors stay in memory too"
    n_early = 0
    for tok in range(t.tokens):
        for l in range(SPEC.n_layers):
            before = eng.caches[l].resident_mask()
            need, flagged = t.read_sets[tok, l], t.lookahead[tok, l]
            early_then = eng.early_load(l, flagged)                 # what an engine issues at layer l-1
            p = eng.plan_layer(l, need, flagged)
            assert np.array_equal(p.early_load, early_then)
            assert not before[p.load].any(), "resident neurons are never read"
            assert np.array_equal(np.flatnonzero(flagged & ~before), np.intersect1d(p.early_load, np.flatnonzero(flagged)))
            assert np.array_equal(covered(p.early_reads), p.early_load)
            assert np.array_equal(covered(p.late_reads), p.late_load)
            assert p.bytes == p.early_bytes + p.late_reads.total_bytes
            assert np.isin(np.flatnonzero(need & ~before), p.load).all(), "every needed neuron is read or resident"
            assert p.n_new_active == np.count_nonzero(need & ~before) and np.array_equal(p.active, np.flatnonzero(need))
            assert not np.isin(p.evict, p.active).any() and p.resident <= eng.capacity
            if not kw.get("coalesce_gap"):
                assert np.isin(p.late_load, np.flatnonzero(need)).all(), "late reads fetch only what is needed"
            n_early += p.n_early_reads
        eng.next_token()
    assert n_early > 0


def test_lookahead_off_ignores_the_sets_and_gap_zero_changes_nothing():
    t = trace(12)
    plain = Trace(active=t.active, predicted=t.predicted)
    for pol in (policy(), policy(eviction="frequency")):
        a = list(PolicyEngine(SPEC, pol).plan_trace(t))
        b = list(PolicyEngine(SPEC, pol).plan_trace(plain))
        assert all(np.array_equal(x.load, y.load) and np.array_equal(x.reads.offset, y.reads.offset)
                   and x.n_early_reads == 0 for u, v in zip(a, b) for x, y in zip(u, v))
    with pytest.raises(ConfigError, match="no look-ahead sets"):
        list(PolicyEngine(SPEC, policy(lookahead=1)).plan_trace(plain))


def reference_bridge(ids, blocked, max_gap, max_run):
    out, start, prev = set(ids.tolist()), None, None
    for i in ids:
        if prev is not None and i - prev - 1 <= max_gap and not blocked[prev + 1:i].any() and i - start < max_run:
            out.update(range(prev + 1, i))
        else:
            start = i
        prev = i
    return np.array(sorted(out), dtype=np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_bridge_gaps_is_the_greedy_reads_and_layout_cuts_them_alike(seed):
    rng = np.random.default_rng(seed)
    F = 400
    ids = np.flatnonzero(rng.random(F) < rng.choice([0.05, 0.2, 0.5]))
    blocked = (rng.random(F) < 0.1) & ~np.isin(np.arange(F), ids)
    gap, run = int(rng.integers(1, 4)), int(rng.integers(3, 9))
    got = bridge_gaps(ids, blocked, gap, run)
    assert np.array_equal(got, reference_bridge(ids, blocked, gap, run))
    assert not blocked[got].any() and np.isin(ids, got).all()
    start, count = neuron_runs(got, run)
    for s, c in zip(start, count):                  # every read starts and ends on a needed neuron
        assert s in ids and s + c - 1 in ids and c <= run
    assert np.array_equal(bridge_gaps(ids, blocked, 0, run), ids)


def test_coalescing_counts_the_bridged_bytes_and_makes_fewer_larger_reads():
    t = trace(10, sparsity=0.7)
    runs = {g: list(PolicyEngine(SPEC, policy(coalesce_gap=g, chunk_kib=128)).plan_trace(t)) for g in (0, 2)}
    n = {g: sum(p.n_reads for tok in r for p in tok) for g, r in runs.items()}
    b = {g: sum(p.bytes for tok in r for p in tok) for g, r in runs.items()}
    loads = {g: sum(p.load.size for tok in r for p in tok) for g, r in runs.items()}
    assert n[2] < n[0] and b[2] > b[0]
    assert b[2] - b[0] == (loads[2] - loads[0]) * PolicyEngine(SPEC, policy()).layout.bytes_per_neuron


HW = HardwareProfile.preset("h100-calibrated")


def test_simulator_overlaps_early_reads_with_the_layer_before():
    """With a look-ahead that flags exactly the read sets and the whole FFN fitting the budget (same bytes either
    way), the early reads of layer l+1 start before layer l+1's attention and the token gets faster; the late reads
    queue behind the early ones."""
    t = trace(8)
    t = Trace(active=t.active, predicted=t.predicted, lookahead=np.concatenate(
        [np.zeros_like(t.read_sets[:, :1]), t.read_sets[:, 1:]], axis=1))
    base, la = policy(memory_budget=1.0), policy(memory_budget=1.0, lookahead=1)
    r0 = simulate(SPEC, HW, base, t)
    r1 = simulate(SPEC, HW, la, t, record_timeline=True)
    assert [c.bytes for c in r0.tokens] == [c.bytes for c in r1.tokens]
    assert r1.summary(1)["latency_ms"] < r0.summary(1)["latency_ms"]
    ev = [e for e in r1.timeline if e.token == 3]
    for l in range(1, SPEC.n_layers):
        early = [e for e in ev if e.kind == "read_early" and e.layer == l]
        attn = [e for e in ev if e.kind == "attention" and e.layer == l]
        assert early and early[0].start < attn[0].start
        late = [e for e in ev if e.kind == "read" and e.layer == l]
        assert not late or late[0].start >= early[0].end - 1e-12


def test_simulator_without_lookahead_is_unchanged_by_the_knobs():
    t = trace(6)
    a = simulate(SPEC, HW, policy(), t).summary(1)
    b = simulate(SPEC, HW, policy(), Trace(active=t.active, predicted=t.predicted)).summary(1)
    assert a == b
