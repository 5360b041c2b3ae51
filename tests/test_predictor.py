"""The low-rank predictor learns which neurons fire; the masked FFN computes only those."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from real.predictor import (LowRankPredictor, language_model_scores, prediction_metrics,  # noqa: E402
                            predicted_ffn, random_predictor, recall_threshold, train_predictor)
from real.record import record  # noqa: E402
from sim.trace import Trace  # noqa: E402


def linear_relu_data(tokens=3000, layers=2, d=32, F=256, rank=6, seed=0):
    """Inputs and masks of a ReLU layer whose weights are low rank: learnable by a rank-r predictor."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, layers, d)).astype(np.float32)
    active = np.zeros((tokens, layers, F), dtype=bool)
    for l in range(layers):
        W = rng.normal(size=(d, rank)) @ rng.normal(size=(rank, F)) / np.sqrt(d * rank)
        b = -1.3 * np.abs(W).sum(0) / np.sqrt(d) - rng.random(F)
        active[:, l] = x[:, l] @ W + b > 0
    return x, active


def test_trained_predictor_beats_random_at_equal_reads():
    x, active = linear_relu_data()
    cut = 2400
    pred = train_predictor(x[:cut], active[:cut], rank=8, target_recall=0.95, steps=900)
    p = pred.predict_all(x[cut:])
    m = prediction_metrics(p, active[cut:])
    reads = p.sum(axis=(0, 2)) / p.shape[0]
    r = prediction_metrics(random_predictor(active[cut:], reads), active[cut:])
    assert 0.05 < 1 - active.mean() and active.mean() < 0.3
    assert abs(r["reads_vs_oracle"] - m["reads_vs_oracle"]) < 0.05 * m["reads_vs_oracle"]
    assert m["recall"] > 0.9 and m["recall"] > r["recall"] + 0.3
    assert m["reads_vs_oracle"] < 2.0
    assert abs(m["fnr"] - (1 - m["recall"])) < 1e-12


def test_threshold_reaches_target_recall_on_its_own_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 64))
    active = rng.random((500, 64)) < 0.1
    for target in (0.5, 0.9, 0.99):
        t = recall_threshold(logits, active, target)
        assert (logits[active] >= t).mean() >= target


def test_save_load_roundtrip(tmp_path):
    x, active = linear_relu_data(tokens=600, layers=2, F=64)
    pred = train_predictor(x, active, rank=4, steps=50, meta={"model": "toy"})
    back = LowRankPredictor.load(pred.save(tmp_path / "p.safetensors"))
    assert back.rank == 4 and back.meta["model"] == "toy" and back.meta["rank"] == 4
    assert np.array_equal(back.predict_all(x), pred.predict_all(x))


def test_masked_ffn_keeps_only_predicted_neurons():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=128,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 dropout=0.0)
    model = transformers.OPTForCausalLM(cfg).eval()
    seqs = [np.random.default_rng(s).integers(0, 64, size=24) for s in range(4)]
    active, inputs = record(model, seqs, save_inputs=True)
    pred = train_predictor(inputs, active, rank=8, target_recall=0.9, steps=300)
    dense = language_model_scores(model, seqs)
    # everything predicted: the masked model is the dense model
    everything = LowRankPredictor(pred.A, pred.B, pred.bias, np.full(2, -np.inf, dtype=np.float32))
    with predicted_ffn(model, everything):
        assert language_model_scores(model, seqs)["nll"] == pytest.approx(dense["nll"], rel=1e-6)
    # the hook keeps exactly what predict_all says, layer by layer (layer 0 sees the same inputs)
    with predicted_ffn(model, pred) as stats:
        masked = language_model_scores(model, seqs)
        seen, _ = record(model, seqs, save_inputs=False)
    p0 = pred.predict_all(inputs)[:, 0]
    differ = seen[:, 0] != (active[:, 0] & p0)
    # numpy and torch round the logits differently: disagreements only right at the threshold
    margin = np.abs(pred.logits(0, inputs[:, 0]) - pred.threshold[0])
    assert differ.sum() <= 3 and np.all(margin[differ] < 1e-4)
    assert stats["kept"] > 0 and masked["nll"] != dense["nll"]
    # the written trace carries the prediction for policy.predictor=trace
    tr = Trace(active=active, predicted=pred.predict_all(inputs))
    assert tr.predicted.sum() == pytest.approx(pred.predict_all(inputs).sum())
