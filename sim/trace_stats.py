"""Statistics of a trace that windowing and the predictor care about (torch-free).

- sparsity per layer: the share of neurons that are exactly zero;
- the new-neurons curve: per token and layer, the share of neurons active now but in none of the
  previous k tokens (what a window of k must read), for k = 1..8;
- co-activation: do neurons fire together more than chance? For each neuron, the Jaccard index with
  its best partner (the other neuron whose firing tokens overlap its own most), averaged; reported
  beside the same number after shifting each neuron's time series by a random offset (which keeps
  every neuron's rate and destroys co-activation), so the gap is what co-activation adds;
- the shares a paper states (``read_shares``): true active, predicted (what a policy with
  ``predictor=trace`` reads) and its ratio to the active share, the predictor's recall and
  false-positive rate, and over the predicted sets the union of a window of k tokens and the share
  new per token;
- look-ahead sets against the read sets (``lookahead_shares``): recall, false positives, and how many of the
  extras a window would not already hold."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sim.trace import Trace, new_share, union_share

WINDOWS = tuple(range(1, 9))


def new_neurons_curve_per_layer(active: np.ndarray, windows: Sequence[int] = WINDOWS) -> np.ndarray:
    """[layers, len(windows)]: ``Trace.new_neurons_curve`` for each layer separately."""
    return np.stack([Trace(active=active[:, l:l + 1]).new_neurons_curve(windows)
                     for l in range(active.shape[1])])


def best_partner_jaccard(active: np.ndarray, max_neurons: int = 2048, max_tokens: int = 4096,
                         shuffle_seed: int | None = None) -> float:
    """Mean best-partner Jaccard index of one layer's neurons (``active``: bool [tokens, d_ff]).

    Only neurons that fire at least twice count; at most ``max_neurons`` of them (the first, by id,
    so a recorded and a synthetic trace of the same width are scored alike) and the first
    ``max_tokens`` tokens. With ``shuffle_seed`` each neuron's series is first rolled by a random
    offset: the chance level."""
    a = active[:max_tokens]
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        T = a.shape[0]
        shifts = rng.integers(0, T, size=a.shape[1])
        rows = (np.arange(T)[:, None] + shifts[None, :]) % T
        a = np.take_along_axis(a, rows, axis=0)
    keep = np.flatnonzero(a.sum(axis=0) >= 2)[:max_neurons]
    if keep.size < 2:
        return float("nan")
    x = a[:, keep].astype(np.float32)
    inter = x.T @ x
    count = np.diag(inter).copy()
    union = count[:, None] + count[None, :] - inter
    jac = inter / np.maximum(union, 1.0)
    np.fill_diagonal(jac, -1.0)
    return float(jac.max(axis=1).mean())


def coactivation(trace: Trace, max_neurons: int = 2048, max_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (best-partner Jaccard, the same at chance level)."""
    obs = np.array([best_partner_jaccard(trace.active[:, l], max_neurons, max_tokens)
                    for l in range(trace.n_layers)])
    base = np.array([best_partner_jaccard(trace.active[:, l], max_neurons, max_tokens, shuffle_seed=l)
                     for l in range(trace.n_layers)])
    return obs, base


def read_shares(trace: Trace, window: int) -> dict[str, float]:
    """Shares of the FFN's neurons per token (means over tokens and layers): ``active`` (true), ``predicted`` (the
    read sets: predicted, or active where the trace has no predictor) and ``predicted_over_active``,
    ``predictor_recall`` (share of the active neurons predicted), ``predictor_fp_rate`` (share of the inactive
    neurons predicted), and over the read sets ``window_union`` (the last ``window`` tokens' union, this one
    included: what a window of k keeps resident) and ``new_per_token`` (read now, in none of the previous
    ``window`` tokens' sets: what it loads)."""
    a, r = trace.active, trace.read_sets
    n_active, n_read = int(a.sum()), int(r.sum())
    return {"active": float(a.mean()), "predicted": float(r.mean()), "predicted_over_active": n_read / max(n_active, 1),
            "predictor_recall": float((a & r).sum() / max(n_active, 1)),
            "predictor_fp_rate": float((r & ~a).sum() / max(a.size - n_active, 1)),
            "window": window, "window_union": union_share(r, window), "new_per_token": float(new_share(r, [window])[0])}


def recent(sets: np.ndarray, window: int) -> np.ndarray:
    """bool like ``sets[window:]``: for each token from ``window`` on, the union of the previous ``window`` tokens'
    sets (what a window of k holds before the token)."""
    T = sets.shape[0]
    seen = np.zeros_like(sets[window:])
    for j in range(1, window + 1):
        seen |= sets[window - j:T - j]
    return seen


HOT_SHARE = 0.2   # lookahead_shares' cold_recall: neurons outside each layer's most often needed 20% (about what
                  # OPT-6.7B's neuron cache holds at memory_budget 0.5: 3383 of 16384)


def lookahead_shares(needed: np.ndarray, lookahead: np.ndarray, window: int = 5) -> dict[str, float]:
    """How a look-ahead set (``lookahead``: bool [tokens, layers, d_ff], layer l's flagged from layer l-1's input)
    relates to the set each layer reads (``needed``: the predicted sets, or the active ones), over layers >= 1 (layer
    0 has no layer before it): ``recall`` (share of the needed neurons flagged), ``fp`` (flagged outside the needed
    set, per needed neuron), ``precision``, ``new_recall`` (share of the needed neurons in none of the previous
    ``window`` tokens' needed sets that are flagged: the reads a look-ahead can move early under a window cache),
    ``cold_recall`` (share flagged of the needed neurons outside the layer's ``HOT_SHARE`` most often needed: the ones
    a frequency cache does not hold), ``extras_outside_window`` (share of the flagged-but-not-needed ones that are in
    none of the previous ``window`` needed sets either: roughly, what a window cache does not already hold, so that
    reading them early costs bytes) and ``extras_per_new`` (those per new needed neuron)."""
    n, q = needed[:, 1:], lookahead[:, 1:]
    hits, extras = q & n, q & ~n
    seen = recent(n, window)
    new, far = n[window:] & ~seen, extras[window:] & ~seen
    freq = n.sum(axis=0)                                      # [layers, d_ff]
    cut = np.sort(freq, axis=1)[:, ::-1][:, max(int(HOT_SHARE * freq.shape[1]) - 1, 0)]
    cold = n & (freq < cut[:, None])[None]
    return {"recall": float(hits.sum() / max(n.sum(), 1)), "fp": float(extras.sum() / max(n.sum(), 1)),
            "precision": float(hits.sum() / max(q.sum(), 1)),
            "new_recall": float((q[window:] & new).sum() / max(new.sum(), 1)),
            "cold_recall": float((q & cold).sum() / max(cold.sum(), 1)),
            "extras_outside_window": float(far.sum() / max(extras[window:].sum(), 1)),
            "extras_per_new": float(far.sum() / max(new.sum(), 1)), "window": window}


def summarize(trace: Trace, windows: Sequence[int] = WINDOWS) -> dict[str, Any]:
    """The numbers ``real.record`` prints and the calibration matches, as plain lists."""
    per_layer = new_neurons_curve_per_layer(trace.active, windows)
    obs, base = coactivation(trace)
    active_per_token = trace.active.sum(axis=2).mean(axis=0)
    return {"tokens": trace.tokens, "layers": trace.n_layers, "d_ff": trace.d_ff,
            "sparsity": trace.sparsity().tolist(), "mean_sparsity": float(trace.sparsity().mean()),
            "active_per_token": active_per_token.tolist(),
            "windows": list(windows), "new_curve": trace.new_neurons_curve(windows).tolist(),
            "new_curve_per_layer": per_layer.tolist(),
            "coactivation_jaccard": obs.tolist(), "coactivation_chance": base.tolist()}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"trace: {s['tokens']} tokens x {s['layers']} layers x {s['d_ff']} neurons; "
             f"mean sparsity {s['mean_sparsity']:.4f}",
             "layer  sparsity  active/token  best-partner Jaccard (chance)"]
    for l in range(s["layers"]):
        lines.append(f"{l:5d}  {s['sparsity'][l]:8.4f}  {s['active_per_token'][l]:12.1f}  "
                     f"{s['coactivation_jaccard'][l]:.3f} ({s['coactivation_chance'][l]:.3f})")
    lines.append("window k:              " + " ".join(f"{k:7d}" for k in s["windows"]))
    lines.append("new neurons / token (%)" + " ".join(f"{100 * v:7.3f}" for v in s["new_curve"]))
    return "\n".join(lines)
