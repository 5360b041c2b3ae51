"""Look-ahead predictors (Deja Vu's idea): layer l's active set guessed from layer l-1's FFN input, so that layer l's
reads can start while layer l-1 still computes (``policy.lookahead=1``, docs/lookahead.md).

A look-ahead predictor is a ``real.predictor.LowRankPredictor`` with one entry per layer after the first: entry j
maps layer j's FFN input to layer j+1's active set. It is trained exactly like the same-layer predictor (balanced
BCE, threshold for a target recall on the last 20% of the training tokens), only with the targets shifted by one
layer. The same-layer predictor stays: it decides what each layer computes, and what the look-ahead missed is
fetched late, after it ("on demand"). So the look-ahead changes which reads come early and how many bytes are read,
never which neurons are computed: the model's output with the look-ahead is exactly the same-layer predictor's
(``lookahead_ffn`` shows it on held-out text; ``LookaheadFlashModel`` runs it through the flash engine).

    python -m real.predictor train --lookahead --trace TRAIN.npz --out LA.safetensors      # see real.predictor
    python -m real.predictor apply --predictor P.safetensors --lookahead-predictor LA.safetensors --trace T.npz --out O.npz
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

from real.predictor import LowRankPredictor, ffn_hooks, train_predictor
from sim.errors import require


def train_lookahead(inputs: np.ndarray, active: np.ndarray, rank: int = 32, target_recall: float = 0.95,
                    steps: int = 2000, seed: int = 0, meta: dict | None = None) -> LowRankPredictor:
    """From FFN inputs [tokens, layers, d_model] and active sets [tokens, layers, d_ff]: entry j predicts layer j+1's
    set from layer j's input (``train_predictor`` on the inputs without the last layer and the sets without the
    first)."""
    require(inputs.shape[1] >= 2, "trace", f"has {inputs.shape[1]} layer(s); a look-ahead needs at least 2",
            "record a model with several layers")
    return train_predictor(inputs[:, :-1], active[:, 1:], rank, target_recall, steps=steps, seed=seed,
                           meta=dict(meta or {}, lookahead=1))


def lookahead_logits(pred: LowRankPredictor, inputs: np.ndarray) -> np.ndarray:
    """float [tokens, layers, d_ff]: per layer l >= 1 the look-ahead logits from layer l-1's input (layer 0: -inf)."""
    T, L, _ = inputs.shape
    require(pred.n_layers == L - 1, "lookahead predictor", f"has {pred.n_layers} entries, the inputs {L} layers "
            f"(a look-ahead has one per layer after the first: {L - 1})", "use a look-ahead trained for this model")
    out = np.full((T, L, pred.B[0].shape[1]), -np.inf, dtype=np.float32)
    for l in range(1, L):
        out[:, l] = pred.logits(l - 1, inputs[:, l - 1])
    return out


def predict_lookahead(pred: LowRankPredictor, inputs: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """bool [tokens, layers, d_ff]: the look-ahead sets (``Trace.lookahead``); ``offset`` raises every threshold
    (fewer false positives, lower recall)."""
    thr = np.concatenate(([np.inf], np.asarray(pred.threshold, dtype=np.float32) + offset))
    return lookahead_logits(pred, inputs) >= thr[None, :, None]


# ---- the look-ahead inside the model ------------------------------------------------------------
@contextlib.contextmanager
def lookahead_ffn(model, predictor: LowRankPredictor | None, lookahead: LowRankPredictor,
                  offset: float = 0.0) -> Iterator[dict[str, float]]:
    """While active, every FFN computes only the neurons its same-layer ``predictor`` flags (all truly active ones
    with ``predictor=None``: the oracle), gathered from two sources as a flash engine with a look-ahead has them:
    the rows read early (layer l's look-ahead set, computed in layer l-1's hook from its input) and the ones fetched
    late (what the layer needs that the look-ahead missed). The computed mask is (needed & early) | late with late
    = needed & ~early, i.e. the needed set whatever the look-ahead says, so the output equals ``predicted_ffn``'s
    (the oracle's: the dense model's) bit for bit. Yields counters over tokens x layers: ``needed``, ``early``
    (flagged early), ``early_hits`` (early and needed), ``late`` and ``tokens``."""
    import torch
    from real.record import ffn_up_modules
    mods = ffn_up_modules(model)
    require(lookahead.n_layers == len(mods) - 1, "lookahead predictor", f"has {lookahead.n_layers} entries, the "
            f"model {len(mods)} layers", "use a look-ahead trained for this model (one entry per layer after the first)")
    require(predictor is None or predictor.n_layers == len(mods), "predictor",
            f"has {predictor.n_layers if predictor else 0} layers, the model {len(mods)}", "use this model's predictor")
    stats = {"needed": 0.0, "early": 0.0, "early_hits": 0.0, "late": 0.0, "tokens": 0.0}
    early: dict[int, torch.Tensor] = {}
    as_t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731

    def flags(p: LowRankPredictor, j: int, x: torch.Tensor, thr: float) -> torch.Tensor:
        return ((x @ as_t(p.A[j])) @ as_t(p.B[j]) + as_t(p.bias[j])) >= thr

    def hook_for(l: int):
        def hook(module, args, out):
            x = args[0].float()
            needed = out > 0 if predictor is None else flags(predictor, l, x, float(predictor.threshold[l]))
            if l + 1 < len(mods):                   # the next layer's look-ahead runs on this layer's input
                early[l + 1] = flags(lookahead, l, x, float(lookahead.threshold[l]) + offset)
            got = early.pop(l, torch.zeros_like(needed))
            late = needed & ~got
            keep = (needed & got) | late
            for key, mask in (("needed", needed), ("early", got), ("early_hits", needed & got), ("late", late)):
                stats[key] += float(mask.sum())
            stats["tokens"] += needed.numel() / needed.shape[-1]
            return out * keep.to(out.dtype)
        return hook

    with ffn_hooks(mods, hook_for):
        yield stats


def _lookahead_engine_class():
    from sim.plan import PolicyEngine

    class LookaheadPolicyEngine(PolicyEngine):
        """A PolicyEngine that plans each layer with the look-ahead set its model stored for it (``pending``), as
        an engine learning the sets live does: layer l's is known once layer l-1's input is."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.pending: dict[int, np.ndarray] = {}

        def plan_layer(self, layer: int, active: np.ndarray, lookahead: np.ndarray | None = None):
            got = self.pending.pop(layer, None)
            return super().plan_layer(layer, active, got if lookahead is None else lookahead)

    return LookaheadPolicyEngine


def lookahead_flash_model(model, flash, policy, *, lookahead: LowRankPredictor, offset: float = 0.0,
                          calibration_counts: np.ndarray | None = None, **kw):
    """A ``real.engine.HFFlashModel`` (model mode: every FFN served from ``flash`` through live plans) whose plans
    carry look-ahead reads: at each layer the look-ahead predictor runs on the FFN input and its set for the next
    layer goes into that layer's plan (``policy.lookahead=1``: read early, the rest late). The reads are executed
    in order within the layer (this engine does not yet issue them a layer early; docs/lookahead.md); what is
    computed is what the same-layer predictor (or the oracle) flags, so tokens and logits are the model's
    without a look-ahead. ``kw`` as HFFlashModel's."""
    from real.engine import HFFlashModel

    require(policy.lookahead == 1, "policy.lookahead", f"is {policy.lookahead}; this model plans look-ahead reads",
            "pass a policy with lookahead=1")
    m = HFFlashModel(model, flash, policy, calibration_counts=calibration_counts, **kw)
    engine = _lookahead_engine_class()(m.engine.spec, policy, calibration_counts)
    require(engine.capacity == m.engine.capacity, "policy", "the engine's capacity changed", "report this as a bug")
    m.engine = engine
    n_layers = engine.spec.n_layers
    base_active_set = m.active_set

    def active_set(layer: int, x):
        if layer + 1 < n_layers:
            xs = x.float().cpu().numpy().reshape(-1, x.shape[-1])
            flagged = lookahead.logits(layer, xs) >= float(lookahead.threshold[layer]) + offset
            engine.pending[layer + 1] = flagged.any(0)
        return base_active_set(layer, x)

    m.active_set = active_set
    return m


def stream_scores(m, seqs: Sequence[np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
    """Teacher-forced next-token scores of a flash model fed one token a step (each sequence from an empty KV cache),
    as ``real.predictor.language_model_scores`` computes them for the in-memory model; also the logits
    [tokens, vocab] (float32)."""
    import torch
    nll, hits, n, all_logits = 0.0, 0, 0, []
    with torch.no_grad():
        for seq in seqs:
            m.past = None
            logits = torch.stack([m.step(torch.tensor([[int(tok)]]))[0][0].float().cpu() for tok in seq[:-1]])
            target = torch.from_numpy(np.asarray(seq[1:], dtype=np.int64))
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            hits += int((logits.argmax(-1) == target).sum())
            n += target.numel()
            all_logits.append(logits.numpy())
    return {"ppl": float(np.exp(nll / n)), "accuracy": hits / n, "nll": nll / n, "tokens": n}, np.concatenate(all_logits)
