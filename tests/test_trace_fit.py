"""Calibration recovers the knobs of a synthetic trace it was fitted to; presets load and validate."""

import numpy as np
import pytest

from sim.model_spec import ModelSpec
from sim.presets import load_preset, preset_names
from sim.trace import SyntheticTraceConfig, generate_trace
from sim.trace_fit import expected_curve, expected_read_shares, fit_fp_runs, fit_trace, preset_yaml
from sim.trace_stats import best_partner_jaccard, read_shares, summarize

SPEC = ModelSpec(name="fit-test", n_layers=2, d_model=64, d_ff=512, n_heads=1, vocab=1)


def test_closed_form_curve_matches_generated_trace():
    cfg = SyntheticTraceConfig(tokens=1500, seed=1, sparsity=0.9, reuse=0.6, rate_skew=0.8)
    got = generate_trace(SPEC, cfg).new_neurons_curve(range(1, 9))
    want = expected_curve([0.1], 0.6, 0.8)
    assert np.max(np.abs(got - want) / want) < 0.08


@pytest.mark.parametrize("truth", [
    dict(sparsity=[0.9, 0.95], reuse=0.5, rate_skew=1.0, coactivation=0.3),
    dict(sparsity=[0.97, 0.97], reuse=0.2, rate_skew=0.5, coactivation=0.0),
])
def test_fit_recovers_the_knobs_of_a_synthetic_trace(truth):
    # Tolerances: sparsity within 0.005, reuse within 0.05, rate_skew within 0.2, coactivation within 0.1,
    # and the regenerated (other-seed) trace's curve within 10% of the fitted one.
    trace = generate_trace(SPEC, SyntheticTraceConfig(tokens=2000, seed=3, **truth))
    fit = fit_trace(trace, seed=11)
    c = fit.config
    assert np.allclose(c.sparsity, truth["sparsity"], atol=0.005)
    assert abs(c.reuse - truth["reuse"]) < 0.05
    assert abs(c.rate_skew - truth["rate_skew"]) < 0.2
    assert abs(c.coactivation - truth["coactivation"]) < 0.1
    assert fit.max_rel_err < 0.10


@pytest.mark.parametrize("knobs", [
    dict(predictor_recall=0.9, predictor_fp=1.0),                                    # independent false positives
    dict(predictor_recall=0.95, predictor_fp=2.0, predictor_fp_reuse=0.9, predictor_fp_duty=0.5),   # in runs
    dict(predictor_recall=0.8, predictor_fp=0.5, predictor_fp_reuse=0.6, predictor_fp_duty=1.0),
])
def test_closed_form_read_shares_match_generated_predicted_sets(knobs):
    """expected_read_shares (the four-state chain sim.trace_fit fits the paper presets with) against a generated
    trace's measured shares: within 4% (sampling noise of 2 x 8192 neurons x 600 tokens is ~1%)."""
    spec = ModelSpec(name="fit-test", n_layers=2, d_model=64, d_ff=8192, n_heads=1, vocab=1)
    cfg = SyntheticTraceConfig(tokens=600, seed=2, sparsity=0.96, reuse=0.3, rate_skew=1.0, **knobs)
    got = read_shares(generate_trace(spec, cfg), 4)
    want = expected_read_shares(0.04, 0.3, 1.0, cfg.predictor_recall, cfg.predictor_fp, cfg.predictor_fp_reuse,
                                cfg.predictor_fp_duty, 4)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=0.04), key


def test_fp_runs_fit_reaches_its_targets_and_runs_are_needed():
    """OPT-6.7B-like shares: 9.6% predicted per token, 24% in a window of 5, 2.4% new. Independent false positives
    (reuse 0, duty 1) would give a union far above 24%; the fitted runs reach both targets."""
    fp = 0.07 * 0.97 / 0.03
    iid = expected_read_shares(0.03, 0.37, 1.2, 0.95, fp, 0.0, 1.0, 5)
    assert iid["window_union"] > 0.35 and iid["new_per_token"] > 0.05
    fp_reuse, duty = fit_fp_runs(0.03, 0.37, 1.2, 0.95, fp, 5, 0.24, 0.024)
    got = expected_read_shares(0.03, 0.37, 1.2, 0.95, fp, fp_reuse, duty, 5)
    assert got["window_union"] == pytest.approx(0.24, rel=1e-3) and got["new_per_token"] == pytest.approx(0.024, rel=1e-3)
    assert 0.5 < fp_reuse < 1 and 0 < duty < 1


def test_preset_yaml_roundtrip_and_committed_presets_validate(tmp_path):
    cfg = SyntheticTraceConfig(sparsity=[0.9, 0.8], reuse=0.3)
    import yaml
    data = yaml.safe_load(preset_yaml(cfg, "header"))
    assert data.pop("kind") == "synthetic"
    assert SyntheticTraceConfig.from_dict(data) == cfg
    for name in preset_names("trace"):
        d = load_preset("trace", name)
        if d.pop("kind", None) == "synthetic":
            SyntheticTraceConfig.from_dict(d)


def test_coactivation_statistic_sees_clusters():
    a = generate_trace(SPEC, SyntheticTraceConfig(tokens=600, sparsity=0.9, coactivation=0.0)).active[:, 0]
    b = generate_trace(SPEC, SyntheticTraceConfig(tokens=600, sparsity=0.9, coactivation=0.5)).active[:, 0]
    assert best_partner_jaccard(b) > best_partner_jaccard(a) + 0.2
    assert best_partner_jaccard(b, shuffle_seed=0) < best_partner_jaccard(b) - 0.2
    s = summarize(generate_trace(SPEC, SyntheticTraceConfig(tokens=50)))
    assert len(s["new_curve_per_layer"]) == 2 and s["tokens"] == 50
