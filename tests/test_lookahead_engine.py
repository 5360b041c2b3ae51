"""Look-ahead on the torch side (docs/lookahead.md): correctness never depends on the look-ahead. On the small trained
model the perplexity with look-ahead reads and on-demand late fetches is exactly the same-layer predictor's (and with
the oracle, the dense model's); through the flash engine in model mode the computed sets are the same and so are the
scores; in trace mode the engine executes look-ahead and coalesced plans exactly (FFN = masked dense FFN, caches =
the policy engine's)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from real.corpus import stdlib_bytes  # noqa: E402
from real.engine import FlashFFN, HFFlashModel  # noqa: E402
from real.flash_cache import build_opt, flash_dir_for  # noqa: E402
from real.hf_checkpoint import Checkpoint, converted_flash  # noqa: E402
from real.lookahead import (lookahead_ffn, lookahead_flash_model, predict_lookahead, stream_scores,  # noqa: E402
                            train_lookahead)
from real.predictor import LowRankPredictor, language_model_scores, predicted_ffn  # noqa: E402
from real.record import load_model, record, tokenize  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.trace import SyntheticTraceConfig, generate_trace  # noqa: E402
from test_engine import SPEC as TINY, assert_trace_mode_exact  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "small-relu-opt"


@pytest.fixture(scope="module")
def small():
    """The small trained model, its committed same-layer predictor, a quickly trained look-ahead (rank 16, 150
    steps: a weak one is fine, exactness must not depend on its quality) and some held-out sequences."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model(MODEL_DIR)
    seqs = lambda split, tokens: tokenize([stdlib_bytes(split, tokens + 64).decode("utf-8", "replace")],  # noqa: E731
                                          None, 256, 64, "bytes", max_tokens=tokens)[0]
    active, inputs = record(model, seqs("train", 2048), save_inputs=True)
    la = train_lookahead(inputs, active, rank=16, steps=150)
    yield model, LowRankPredictor.load(MODEL_DIR / "predictor-r32.safetensors"), la, seqs("heldout", 512)
    torch.set_num_threads(n)


def test_perplexity_with_lookahead_and_late_fetches_is_exactly_the_predictors(small):
    model, pred, la, held = small
    with predicted_ffn(model, pred):
        same_layer = language_model_scores(model, held)
    with lookahead_ffn(model, pred, la) as st:
        with_la = language_model_scores(model, held)
    assert with_la == same_layer                       # bit for bit: the computed set is the predictor's
    assert 0 < st["early_hits"] < st["needed"] and st["late"] > 0 and st["early"] > st["early_hits"]
    dense = language_model_scores(model, held)
    with lookahead_ffn(model, None, la, offset=1.0):   # oracle late fetches: the dense model
        assert language_model_scores(model, held) == dense
    sets = predict_lookahead(la, np.zeros((3, 4, 128), np.float32))
    assert sets.shape == (3, 4, 1024) and not sets[:, 0].any()


def test_flash_engine_with_lookahead_computes_the_same_sets(small, tmp_path):
    model, pred, la, held = small
    flash = converted_flash(Checkpoint.open(MODEL_DIR), tmp_path, progress=False)
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.8,
                            "predictor_rank": 32})
    runs = {}
    for name in ("same-layer", "look-ahead"):
        if name == "same-layer":
            m = HFFlashModel(load_model(MODEL_DIR), flash, pol, predictor=pred, check_cache=True)
        else:
            m = lookahead_flash_model(load_model(MODEL_DIR), flash, dataclasses.replace(pol, lookahead=1),
                                      lookahead=la, predictor=pred, check_cache=True)
        plans, plan_layer = [], m.engine.plan_layer
        m.engine.plan_layer = lambda *a, **k: (plans.append(plan_layer(*a, **k)), plans[-1])[1]
        try:
            scores, logits = stream_scores(m, [s[:24] for s in held[:2]])
        finally:
            m.close()
        runs[name] = scores, logits, plans
    (s0, l0, p0), (s1, l1, p1) = runs["same-layer"], runs["look-ahead"]
    assert all(np.array_equal(a.active, b.active) for a, b in zip(p0, p1)) and len(p0) == len(p1)
    assert sum(p.n_early_reads for p in p1) > 0 and sum(p.n_early_reads for p in p0) == 0
    assert sum(p.n_early_needed for p in p1) > 0
    tol = 4 * 4 * (1024 + 128) * torch.finfo(torch.float32).eps * float(np.abs(l0).max())
    diff = float(np.abs(l0 - l1).max())
    # float32 sums in another order (a neuron resident in one run is new in the other) move each log-softmax by
    # at most 2x the largest logit difference, so the mean NLL, and log(ppl), by no more
    assert diff <= tol and s1["ppl"] == pytest.approx(s0["ppl"], rel=2 * diff + 1e-9)


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("kw", [{"window": 2, "eviction": "frequency"}, {"window": 3, "coalesce_gap": 2},
                                {"window": 0}, {"window": 2, "recall": 1.0}])
def test_trace_mode_executes_lookahead_and_coalesced_plans_exactly(tmp_path, kw, pipelined):
    """Look-ahead plans executed exactly, with each layer's early reads issued with the layer's own reads
    (``pipelined=False``) or one layer ahead, while the layer before runs, and merged with its late rows."""
    kw = dict(kw)
    recall = kw.pop("recall", 0.7)           # 1.0: layers whose new rows all came early (no late load)
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.95,
                            "predictor_rank": 16, "lookahead": 1, "chunk_kib": 16, **kw})
    trace = generate_trace(TINY, SyntheticTraceConfig(tokens=8, seed=3, sparsity=0.8, reuse=0.5,
                                                      lookahead_recall=recall, lookahead_fp=0.5, lookahead_fp_skew=1.0))

    class WithLookahead(PolicyEngine):
        def plan_token(self, active_per_layer, lookahead_per_layer=None):
            return super().plan_token(active_per_layer, trace.lookahead[self.token])

    engine = WithLookahead(TINY, pol)
    layers = build_opt(TINY).model.decoder.layers
    ffn = FlashFFN(flash_dir_for(TINY, True, tmp_path), engine.capacity, threads=4, pipeline=pipelined,
                   up_bias=[l.fc1.bias.detach() for l in layers], down_bias=[l.fc2.bias.detach() for l in layers])
    seen, ahead, running = [], [], [None]
    run_layer, submit_part = ffn.run_layer, ffn.loads.submit_part

    late = []

    def run(p, *a, **k):
        seen.append((p.n_early_reads, p.load.size - p.n_new_active))
        late.append((p.n_early_reads, p.late_load.size))
        running[0] = p.layer
        return run_layer(p, *a, **k)

    def part(layer, reads, neurons):
        ahead.append(layer - running[0])                 # 1: an early load, issued while the layer before runs
        return submit_part(layer, reads, neurons)

    ffn.run_layer, ffn.loads.submit_part = run, part
    try:
        assert_trace_mode_exact(ffn, engine, trace, layers, "cpu", pipelined=pipelined)
    finally:
        ffn.close()
    assert sum(e for e, _ in seen) > 0 and sum(x for _, x in seen) > 0, "early reads, and reads of unused neurons"
    if recall == 1.0:
        assert any(e and n_late == 0 for e, n_late in late), "a layer with early reads only"
    if pipelined:
        assert ahead.count(1) == sum(1 for e, _ in seen if e), "every early load issued one layer ahead"
        assert set(ahead) <= {0, 1}
    else:
        assert not ahead


def test_a_read_error_mid_pipeline_gives_every_loader_slot_back(tmp_path):
    """An early load's reads fail (as a FlashIOError would) while the layer's late load and the next layer's early
    load are in flight: the error reaches the caller, and every loader slot is free again, so the engine can go on."""
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.95,
                            "predictor_rank": 16, "lookahead": 1, "chunk_kib": 16, "window": 2})
    trace = generate_trace(TINY, SyntheticTraceConfig(tokens=4, seed=3, sparsity=0.8, reuse=0.5, lookahead_recall=0.7,
                                                      lookahead_fp=0.5, lookahead_fp_skew=1.0))
    engine = PolicyEngine(TINY, pol)
    plans = [engine.plan_token(trace.active[t], trace.lookahead[t]) for t in range(trace.tokens)]
    ffn = FlashFFN(flash_dir_for(TINY, True, tmp_path), engine.capacity, threads=4, pipeline=True)
    real_wait = ffn.loads.wait_reads
    fail = {"armed": True}

    def wait_reads(pending):
        if fail["armed"] and ffn._early is not None:       # a later layer's early load is in flight too
            fail["armed"] = False
            raise OSError(5, "injected read error")
        return real_wait(pending)

    ffn.loads.wait_reads = wait_reads
    x = torch.randn(1, TINY.d_model)
    try:
        with pytest.raises(OSError, match="injected"):
            for layer_plans in plans[:2]:
                ffn.begin_token(layer_plans[0].token)
                for i, p in enumerate(layer_plans):
                    ffn.run_layer(p, x, next_plan=layer_plans[i + 1] if i + 1 < len(layer_plans) else None)
                ffn.end_token()
        assert not fail["armed"]
        assert not any(slot.pending for slot in ffn.loads.loader.slots) and ffn._early is None and not ffn._open
    finally:
        ffn.close()
