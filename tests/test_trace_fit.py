"""Calibration recovers the knobs of a synthetic trace it was fitted to; presets load and validate."""

import numpy as np
import pytest

from sim.model_spec import ModelSpec
from sim.presets import load_preset, preset_names
from sim.trace import SyntheticTraceConfig, generate_trace
from sim.trace_fit import (PAPER_OPT_6_7B, expected_curve, fit_paper_opt_6_7b, fit_trace, preset_yaml)
from sim.trace_stats import best_partner_jaccard, summarize

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


def test_paper_preset_reproduces_published_statistics():
    cfg = fit_paper_opt_6_7b()
    assert expected_curve([1 - cfg.sparsity], cfg.reuse, cfg.rate_skew, [5])[0] == pytest.approx(0.024, rel=1e-3)
    spec = ModelSpec(name="opt-like", n_layers=2, d_model=64, d_ff=8192, n_heads=1, vocab=1)
    tr = generate_trace(spec, SyntheticTraceConfig(**{**cfg.__dict__, "tokens": 300}))
    assert tr.sparsity().mean() == pytest.approx(PAPER_OPT_6_7B["sparsity"], abs=0.002)
    assert tr.new_neurons_curve([5])[0] == pytest.approx(0.024, rel=0.05)


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
