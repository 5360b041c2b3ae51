"""The trace file format and the synthetic generator."""

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.model_spec import ModelSpec
from sim.trace import SyntheticTraceConfig, Trace, generate_trace

SPEC = ModelSpec(name="t", n_layers=3, d_model=64, d_ff=1000, n_heads=4, vocab=50, dtype="float32")


def test_generator_is_deterministic_for_a_seed():
    a = generate_trace(SPEC, SyntheticTraceConfig(tokens=10, seed=7))
    b = generate_trace(SPEC, SyntheticTraceConfig(tokens=10, seed=7))
    c = generate_trace(SPEC, SyntheticTraceConfig(tokens=10, seed=8))
    assert np.array_equal(a.active, b.active) and not np.array_equal(a.active, c.active)


def test_save_load_round_trip(tmp_path):
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=6, predictor_recall=0.9, predictor_fp=0.5))
    path = t.save(tmp_path / "x.npz")
    u = Trace.load(path)
    assert np.array_equal(t.active, u.active) and np.array_equal(t.predicted, u.predicted)
    assert u.meta["seed"] == 0 and u.meta["model"] == "t" and u.meta["knobs"]["predictor_fp"] == 0.5


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_knob_sparsity_is_reached(sparsity):
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=200, sparsity=sparsity))
    assert t.sparsity().mean() == pytest.approx(sparsity, abs=0.01)


def test_per_layer_sparsity():
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=200, sparsity=[0.5, 0.8, 0.95], rate_skew=0))
    assert np.allclose(t.sparsity(), [0.5, 0.8, 0.95], atol=0.015)
    with pytest.raises(ConfigError, match="trace.sparsity"):
        generate_trace(SPEC, SyntheticTraceConfig(tokens=5, sparsity=[0.5, 0.8]))


def test_more_reuse_means_fewer_new_neurons():
    lo = generate_trace(SPEC, SyntheticTraceConfig(tokens=100, reuse=0.1)).new_neurons_curve([1, 5])
    hi = generate_trace(SPEC, SyntheticTraceConfig(tokens=100, reuse=0.7)).new_neurons_curve([1, 5])
    assert np.all(hi < lo)


def test_coactivation_makes_neurons_fire_together():
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=300, sparsity=0.9, coactivation=1.0, cluster_size=4))
    a = t.active[:, 0].astype(float)
    corr = np.corrcoef(a.T)
    np.fill_diagonal(corr, 0)
    assert (corr > 0.99).sum(axis=1).mean() >= 2.5  # each neuron has ~3 perfect partners


def test_predictor_knobs():
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=100, predictor_recall=0.8, predictor_fp=1.0))
    recall = (t.predicted & t.active).sum() / t.active.sum()
    fp = (t.predicted & ~t.active).sum() / t.active.sum()
    assert recall == pytest.approx(0.8, abs=0.02) and fp == pytest.approx(1.0, abs=0.1)


def test_paper_calibrated_default_trace():
    """conf/trace/synthetic.yaml: ~97% sparsity, ~2.4% new neurons per token at window 5."""
    spec = ModelSpec.from_dict({**ModelSpec.preset("opt-6.7b").to_dict(), "n_layers": 2})
    t = generate_trace(spec, SyntheticTraceConfig.from_preset(tokens=60))
    assert t.sparsity().mean() == pytest.approx(0.97, abs=0.003)
    assert t.new_neurons_curve([5])[0] == pytest.approx(0.024, abs=0.002)


def test_trace_model_mismatch_is_named():
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=3))
    with pytest.raises(ConfigError, match="trace"):
        t.check_matches(ModelSpec.preset("opt-tiny"))


def test_a_file_that_is_not_a_trace_is_named(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="trace.path"):
        Trace.load(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="trace.path"):
        Trace.load(tmp_path / "other.npz")


def test_calibration_tokens_count_the_same_chains_before_the_trace(tmp_path):
    """calibration_tokens=0 leaves a trace as before; C > 0 counts C tokens of the same neurons' chains
    first (an offline profile: same rates, other tokens) and the trace holds the tokens that follow."""
    plain = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=4))
    assert plain.calibration_counts is None
    same = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=4, calibration_tokens=0))
    assert np.array_equal(plain.active, same.active)
    long = generate_trace(SPEC, SyntheticTraceConfig(tokens=308, seed=4, rate_skew=1.0))
    cal = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=4, rate_skew=1.0, calibration_tokens=300))
    assert np.array_equal(cal.active, long.active[300:])
    assert np.array_equal(cal.calibration_counts, long.active[:300].sum(0))
    assert np.array_equal(cal.calibration_counts, Trace(active=long.active[:300]).activation_counts())
    assert cal.meta["calibration_tokens"] == 300
    u = Trace.load(cal.save(tmp_path / "c.npz"))
    assert np.array_equal(u.calibration_counts, cal.calibration_counts)


def test_calibration_counts_are_checked():
    active = np.zeros((2, SPEC.n_layers, SPEC.d_ff), dtype=bool)
    with pytest.raises(ConfigError, match="trace.calibration_counts"):
        Trace(active=active, calibration_counts=np.zeros((SPEC.n_layers, 5), dtype=np.int32))
    with pytest.raises(ConfigError, match="trace.calibration_counts"):
        Trace(active=active, calibration_counts=-np.ones((SPEC.n_layers, SPEC.d_ff), dtype=np.int32))
    with pytest.raises(ConfigError, match="trace.calibration_tokens"):
        SyntheticTraceConfig(calibration_tokens=-1)


def test_first_keeps_predicted_sets_profile_and_meta():
    t = generate_trace(SPEC, SyntheticTraceConfig(tokens=6, predictor_recall=0.9, calibration_tokens=5))
    u = t.first(4)
    assert u.tokens == 4 and np.array_equal(u.active, t.active[:4]) and np.array_equal(u.predicted, t.predicted[:4])
    assert u.calibration_counts is t.calibration_counts and u.meta == t.meta
