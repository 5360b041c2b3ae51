"""Policy engine invariants (property tests): what is read, what stays, what moves."""

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from sim.layout import FlashLayout, neuron_runs
from sim.model_spec import ModelSpec
from sim.plan import PolicyEngine, ffn_cache_neurons
from sim.policy import Policy
from sim.trace import SyntheticTraceConfig, generate_trace

SPEC = ModelSpec(name="prop", n_layers=2, d_model=256, d_ff=2048, n_heads=4, vocab=64, dtype="float16")

knobs = st.fixed_dictionaries({
    "sparsity": st.floats(0.5, 0.98), "reuse": st.floats(0.0, 0.9), "rate_skew": st.floats(0.0, 1.5),
    "coactivation": st.floats(0.0, 0.8), "seed": st.integers(0, 10_000),
})
policies = st.fixed_dictionaries({
    "window": st.integers(0, 8), "chunk_kib": st.sampled_from([4, 8, 16, 64, 256]),
    "memory_budget": st.floats(0.3, 1.0), "predictor_rank": st.just(16), "eviction": st.sampled_from(["window", "lru", "lfu", "frequency"]),
    "mem_strategy": st.sampled_from(["preallocated", "concat"]), "bundling": st.booleans(),
    "warm_start": st.booleans(),
})


def make_policy(p: dict) -> Policy:
    """A warm start only where the policy keeps neurons beyond the window (else Policy refuses it)."""
    return Policy(**{**p, "warm_start": p["warm_start"] and p["window"] > 0 and p["eviction"] != "window"})


def plans_for(policy: Policy, k: dict, tokens: int = 12):
    trace = generate_trace(SPEC, SyntheticTraceConfig(tokens=tokens, calibration_tokens=6 if policy.warm_start else 0,
                                                      **k))
    return trace, list(PolicyEngine(SPEC, policy).plan_trace(trace))


@settings(max_examples=40, deadline=None)
@given(k=knobs, p=policies)
def test_bytes_equal_new_neurons_times_record(k, p):
    policy = make_policy(p)
    layout = FlashLayout(SPEC, bundled=policy.bundling)
    _, plans = plans_for(policy, k)
    for token in plans:
        for lp in token:
            assert lp.bytes == lp.load.size * layout.bytes_per_neuron
            # every read lies inside its file and is 4 KiB aligned
            assert np.all(lp.reads.offset % 4096 == 0) and np.all(lp.reads.length % 4096 == 0)
            assert np.all(lp.reads.offset + lp.reads.length <= layout.file_bytes())


@settings(max_examples=40, deadline=None)
@given(k=knobs, p=policies)
# found by hypothesis (2026-11-23): the window outgrew the cache at token 6 and fitted again at token 7
@example(k={"sparsity": 0.5, "reuse": 0.75, "rate_skew": 0.0, "coactivation": 0.0, "seed": 0},
         p={"window": 4, "chunk_kib": 4, "memory_budget": 0.859375, "predictor_rank": 16, "eviction": "lfu",
            "mem_strategy": "preallocated", "bundling": False, "warm_start": False})
def test_budget_never_exceeded_and_window_resident(k, p):
    policy = make_policy(p)
    trace, plans = plans_for(policy, k)
    cap = ffn_cache_neurons(SPEC, policy)
    def window_at(t, l):
        return set(np.flatnonzero(trace.active[max(0, t - policy.window + 1):t + 1, l].any(0)).tolist())

    for l in range(SPEC.n_layers):
        resident = set()
        for t, token in enumerate(plans):
            lp = token[l]
            assert lp.resident <= cap
            resident -= set(lp.evict.tolist())
            assert not (set(lp.load.tolist()) & resident), "a resident neuron was read again"
            resident |= set(lp.load[lp.insert_rows >= 0].tolist())
            assert len(resident) == lp.resident
            # what the token computes is either resident or loaded now
            assert set(lp.active.tolist()) <= resident | set(lp.load.tolist())
            # the window stays resident as long as it fitted the cache at every token of its span: a window
            # larger than the cache forces evictions (or transient loads) of neurons that stay in the window
            # for its next w - 1 tokens, and are only read again when next active
            window = window_at(t, l)
            span_fits = all(len(window_at(s, l)) <= cap for s in range(max(0, t - policy.window + 1), t + 1))
            # frequency keeps by counts only; a warm start's first token prefers the profile's neurons
            warm_span = policy.warm_start and t - policy.window + 1 <= 0
            if policy.window > 0 and span_fits and policy.eviction != "frequency" and not warm_span:
                assert window <= resident, "a neuron active within the window was evicted"


@settings(max_examples=30, deadline=None)
@given(k=knobs, p=policies)
def test_windowing_never_reads_more_than_no_windowing(k, p):
    with_window = Policy(**{**p, "window": max(1, p["window"]), "warm_start": False})
    without = Policy(**{**p, "window": 0, "warm_start": False})
    _, a = plans_for(with_window, k)
    _, b = plans_for(without, k)
    for ta, tb in zip(a, b):
        assert sum(lp.bytes for lp in ta) <= sum(lp.bytes for lp in tb)


@settings(max_examples=15, deadline=None)
@given(k=knobs, budget=st.floats(0.45, 1.0), window=st.integers(0, 6))
def test_bundling_halves_reads_at_equal_bytes(k, budget, window):
    """With rows of exactly one 4 KiB page (no padding) and no merging, bundling fetches the same
    bytes in exactly half the reads."""
    spec = ModelSpec(name="b", n_layers=2, d_model=2048, d_ff=8192, n_heads=4, vocab=64, dtype="float16")
    mk = lambda b, chunk: Policy(window=window, bundling=b, chunk_kib=chunk, memory_budget=budget, predictor_rank=16)
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=6, **k))
    bund = list(PolicyEngine(spec, mk(True, 4)).plan_trace(trace))
    unb = list(PolicyEngine(spec, mk(False, 4)).plan_trace(trace))
    for tb, tu in zip(bund, unb):
        for lb, lu in zip(tb, tu):
            assert lb.bytes == lu.bytes
            assert 2 * lb.n_reads == lu.n_reads


def test_moves_fill_gaps_with_last_rows():
    """The paper's memory manager: evicted rows are overwritten by the last rows; rows stay dense."""
    policy = Policy(window=1, memory_budget=1.0)
    eng = PolicyEngine(SPEC, policy)
    a0 = np.zeros(SPEC.d_ff, bool); a0[[1, 2, 3, 4, 5]] = True
    a1 = np.zeros(SPEC.d_ff, bool); a1[[5, 9]] = True
    eng.plan_token([a0, a0])
    lp = eng.plan_token([a1, a1])[0]
    cache = eng.caches[0]
    assert sorted(lp.evict.tolist()) == [1, 2, 3, 4]
    # row 4 (neuron 5) is the last row: it moves into the first gap, row 0
    assert lp.moves.tolist() == [[4, 0]]
    assert cache.n_rows == 2 and set(cache.neuron_at[:2].tolist()) == {5, 9}
    assert cache.row_of[5] == 0 and cache.row_of[9] == 1


def test_naive_reads_every_non_resident_weight():
    policy = Policy.preset("naive")
    trace = generate_trace(SPEC, SyntheticTraceConfig(tokens=3))
    plans = list(PolicyEngine(SPEC, policy).plan_trace(trace))
    cap = ffn_cache_neurons(SPEC, policy)
    layout = FlashLayout(SPEC, bundled=False)
    assert plans[0][0].load.size == SPEC.d_ff
    assert plans[2][0].bytes == (SPEC.d_ff - cap) * layout.bytes_per_neuron
    assert plans[2][0].n_reads <= 2 * -(-(SPEC.d_ff - cap) * layout.record_bytes // policy.chunk_bytes)


@given(ids=st.lists(st.integers(0, 300), unique=True).map(sorted), max_run=st.integers(1, 20))
def test_neuron_runs_cover_ids_exactly(ids, max_run):
    start, count = neuron_runs(np.array(ids, dtype=np.int64), max_run)
    covered = [s + i for s, c in zip(start.tolist(), count.tolist()) for i in range(c)]
    assert covered == ids
    assert np.all(count <= max_run) and np.all(count >= 1)


@pytest.mark.parametrize("eviction,evicted", [("lru", 0), ("lfu", "rare")])
def test_lfu_keeps_the_frequent_neuron_lru_keeps_the_recent(eviction, evicted):
    """Neuron 0 fired twice but long ago; neuron ``cap - 1`` fired once, just now. When a new neuron
    needs the last row, LRU drops neuron 0 and LFU drops the rare one."""
    engine = PolicyEngine(SPEC, Policy(window=1, eviction=eviction, memory_budget=0.5, predictor_rank=16))
    cap = engine.capacity
    assert 3 < cap < SPEC.d_ff
    sets = [range(0, cap - 1), range(0, cap - 1), range(1, cap), [*range(1, cap - 1), cap]]
    for ids in sets:
        active = np.zeros((SPEC.n_layers, SPEC.d_ff), dtype=bool)
        active[:, list(ids)] = True
        plans = engine.plan_token(active)
    want = cap - 1 if evicted == "rare" else evicted
    assert plans[0].evict.tolist() == [want]
    assert plans[0].load.tolist() == [cap]


@pytest.mark.parametrize("eviction,evicted", [("lfu", "rare"), ("frequency", "rare_in_window")])
def test_frequency_eviction_ignores_the_window(eviction, evicted):
    """Window 2. Neurons 1..cap-2 fire at every token; neuron 0 fired at tokens 0-1 (twice, then left the
    window); neuron cap-1 fired once, at token 2 (still in the window). A new neuron needs a row at token 3:
    LFU drops neuron 0 (outside the window first), frequency drops the rarer neuron cap-1 although it is in
    the window."""
    engine = PolicyEngine(SPEC, Policy(window=2, eviction=eviction, memory_budget=0.5, predictor_rank=16))
    cap = engine.capacity
    sets = [range(0, cap - 1), range(0, cap - 1), range(1, cap), [*range(1, cap - 1), cap]]
    for ids in sets:
        active = np.zeros((SPEC.n_layers, SPEC.d_ff), dtype=bool)
        active[:, list(ids)] = True
        plans = engine.plan_token(active)
    assert plans[0].evict.tolist() == [cap - 1 if evicted == "rare_in_window" else 0]


def warm_trace(tokens=12, calibration=64, seed=0):
    return generate_trace(SPEC, SyntheticTraceConfig(tokens=tokens, seed=seed, sparsity=0.9, rate_skew=1.0,
                                                     calibration_tokens=calibration))


def test_warm_start_preloads_the_hottest_neurons_and_counts_them():
    trace = warm_trace()
    pol = Policy(window=2, eviction="frequency", warm_start=True, memory_budget=0.5, predictor_rank=16)
    engine = PolicyEngine(SPEC, pol)
    plans = list(engine.plan_trace(trace))
    cap = engine.capacity
    for l in range(SPEC.n_layers):
        c = trace.calibration_counts[l]
        first = plans[0][l]
        kept = set(first.load[first.insert_rows >= 0].tolist())
        assert len(kept) == cap == first.resident
        assert min(c[list(kept)]) >= max(np.delete(c, list(kept))), "the preload is not the profile's hottest"
        # this token's active neurons are read too (the ones not preloaded stay transient)
        assert set(first.active.tolist()) <= set(first.load.tolist())
        assert first.n_new_active == first.active.size and first.load.size > first.active.size
        # the rows are inserted in load order, as the cache inserts them
        rows = first.insert_rows[first.insert_rows >= 0]
        assert rows.tolist() == list(range(cap))
        # counts start from the profile
        assert np.array_equal(engine.caches[l].uses, c + trace.active[:, l].sum(0))


def test_a_small_profile_leaves_its_free_rows_to_the_first_tokens_active_neurons():
    """A profile that saw fewer neurons than the cache holds (here: 2 calibration tokens) preloads only those;
    the free rows keep the first token's other active neurons, as a cold start would."""
    trace = warm_trace(calibration=2)
    pol = Policy(window=2, eviction="frequency", warm_start=True, memory_budget=0.5, predictor_rank=16)
    engine = PolicyEngine(SPEC, pol)
    first = next(iter(engine.plan_trace(trace)))
    for l, lp in enumerate(first):
        seen = np.flatnonzero(trace.calibration_counts[l])
        assert seen.size + lp.active.size < engine.capacity        # all fit
        kept = lp.load[lp.insert_rows >= 0]
        assert set(kept.tolist()) == set(seen.tolist()) | set(lp.active.tolist())
        assert lp.resident == kept.size


def test_warm_start_with_frequency_reads_less_than_lfu():
    """On a skewed trace an activation profile (other tokens of the same neurons' chains) picks the cache
    better than counting from scratch: fewer bytes after the first token."""
    trace = warm_trace(tokens=40, calibration=200, seed=1)
    def bytes_after_first(**kw):
        pol = Policy(window=2, memory_budget=0.5, predictor_rank=16, **kw)
        return sum(lp.bytes for token in list(PolicyEngine(SPEC, pol).plan_trace(trace))[1:] for lp in token)
    lfu, warm = bytes_after_first(eviction="lfu"), bytes_after_first(eviction="frequency", warm_start=True)
    assert warm < 0.95 * lfu, (warm, lfu)


def test_warm_start_errors_name_the_fix():
    from sim.errors import ConfigError
    with pytest.raises(ConfigError, match="policy.warm_start.*eviction"):
        Policy(window=2, eviction="window", warm_start=True)
    pol = Policy(window=2, eviction="frequency", warm_start=True, memory_budget=0.5, predictor_rank=16)
    with pytest.raises(ConfigError, match="calibration_tokens"):
        list(PolicyEngine(SPEC, pol).plan_trace(warm_trace(calibration=0)))
    with pytest.raises(ConfigError, match="calibration counts"):
        PolicyEngine(SPEC, pol).plan_token(np.zeros((SPEC.n_layers, SPEC.d_ff), dtype=bool))
    with pytest.raises(ConfigError, match="^calibration_counts: must be non-negative integers"):
        PolicyEngine(SPEC, pol, np.zeros((1, SPEC.d_ff), dtype=np.int32))
    with pytest.raises(ConfigError, match="^calibration_counts: must be non-negative integers"):
        PolicyEngine(SPEC, pol, np.full((SPEC.n_layers, SPEC.d_ff), 0.5))
    with pytest.raises(ConfigError, match="warm_start"):
        PolicyEngine(SPEC, Policy(window=2, eviction="lfu", memory_budget=0.5, predictor_rank=16),
                     np.zeros((SPEC.n_layers, SPEC.d_ff), dtype=np.int32))


def test_predictor_trace_reads_the_predicted_sets_oracle_the_active_ones():
    """policy.predictor=trace (the presets') plans the trace's predicted sets, false positives included, and misses
    its false negatives; oracle plans the true active sets; a trace without predicted sets (a perfect predictor)
    gives both the same plans."""
    pol = dict(window=2, memory_budget=1.0, predictor_rank=16)
    imperfect = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=1, predictor_recall=0.9, predictor_fp=1.5,
                                                          predictor_fp_reuse=0.8, predictor_fp_duty=0.5))
    for predictor, sets in (("trace", imperfect.predicted), ("oracle", imperfect.active)):
        plans = list(PolicyEngine(SPEC, Policy(predictor=predictor, **pol)).plan_trace(imperfect))
        for t, token in enumerate(plans):
            for lp in token:
                assert np.array_equal(lp.active, np.flatnonzero(sets[t, lp.layer]))
    assert Policy().predictor == Policy.preset("windowing_bundling").predictor == "trace"
    perfect = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=1))
    assert perfect.predicted is None
    by = {p: list(PolicyEngine(SPEC, Policy(predictor=p, **pol)).plan_trace(perfect)) for p in ("trace", "oracle")}
    assert all(np.array_equal(a.load, b.load) for ta, tb in zip(by["trace"], by["oracle"]) for a, b in zip(ta, tb))
