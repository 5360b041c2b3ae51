"""Activation traces: which FFN neurons fire, per token and layer.

File format (``.npz``): ``active`` and optionally ``predicted`` and ``lookahead`` as bit-packed bool arrays
[tokens, layers, ceil(d_ff/8)], optionally ``calibration_counts`` (int32 [layers, d_ff]: how often each
neuron fired over calibration tokens that are not in ``active``, an offline activation profile), and
``meta`` as a JSON string (model geometry, seed, source, generator knobs). Small, portable, loadable
without torch.

The synthetic generator gives each neuron a two-state Markov chain (fire / not) whose stationary
rate is the layer's density and whose "stay on" probability is the ``reuse`` knob; ``rate_skew``
spreads per-neuron rates (hot and cold neurons), and ``coactivation`` makes a fraction of neurons
copy the state of their cluster's leader, so they fire together. ``lookahead_*`` knobs add look-ahead sets
(``lookahead_sets``; off by default, which leaves every other array as it was)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sim.atomic import atomic_path
from sim.errors import ConfigError, reject_unknown, require
from sim.model_spec import ModelSpec

FORMAT_VERSION = 1
# Keys a trace preset may hold beside the generator's knobs (conf/trace/<model>-paper.yaml): ``targets``, the
# published shares the knobs were fitted to, and ``paper``, the paper's policy setting for that model (window,
# predictor rank, memory budget), which conf/experiment/paper_*.yaml read. The generator ignores both.
METADATA_KEYS = ("targets", "paper")


def new_share(sets: np.ndarray, windows: Sequence[int]) -> np.ndarray:
    """For each k in ``windows``: the mean share of neurons per token and layer that are in this token's set but in
    none of the previous k tokens' (``sets``: bool [tokens, layers, d_ff]; what a window of k must read)."""
    T = sets.shape[0]
    out = []
    for k in windows:
        if T <= k:
            out.append(float("nan"))
            continue
        seen = np.zeros_like(sets[k:])
        for j in range(1, k + 1):
            seen |= sets[k - j:T - j]
        out.append(float((sets[k:] & ~seen).mean()))
    return np.asarray(out)


def union_share(sets: np.ndarray, window: int) -> float:
    """The mean share of neurons per token and layer in the union of the last ``window`` tokens' sets, this one's
    included (what a window of k keeps resident after the token)."""
    T = sets.shape[0]
    if T < window:
        return float("nan")
    union = sets[window - 1:].copy()
    for j in range(1, window):
        union |= sets[window - 1 - j:T - j]
    return float(union.mean())


@dataclass
class Trace:
    active: np.ndarray                    # bool [tokens, layers, d_ff]
    predicted: np.ndarray | None = None   # bool [tokens, layers, d_ff], where a predictor was used
    meta: dict[str, Any] = field(default_factory=dict)
    # int [layers, d_ff]: activations per neuron over meta["calibration_tokens"] tokens run before (and not
    # part of) ``active``: the offline profile a policy with warm_start uses (sim.plan)
    calibration_counts: np.ndarray | None = None
    # bool [tokens, layers, d_ff]: per layer l, the set a look-ahead predictor flags for layer l from layer l-1's FFN
    # input (layer 0: from nothing before it, normally empty); what policy.lookahead=1 reads one layer early
    lookahead: np.ndarray | None = None

    def __post_init__(self) -> None:
        require(self.active.ndim == 3 and self.active.dtype == bool, "trace.active",
                f"must be a bool array [tokens, layers, d_ff], got {self.active.dtype} {self.active.shape}",
                "build traces with generate_trace() or Trace.load()")
        for name in ("predicted", "lookahead"):
            sets = getattr(self, name)
            if sets is not None:
                require(sets.shape == self.active.shape and sets.dtype == bool, f"trace.{name}",
                        f"must be a bool array shaped like active {self.active.shape}, got {sets.dtype} {sets.shape}",
                        "record both sets for the same tokens and layers")
        if self.calibration_counts is not None:
            c = self.calibration_counts
            require(c.shape == self.active.shape[1:] and np.issubdtype(c.dtype, np.integer) and
                    (c.size == 0 or c.min() >= 0), "trace.calibration_counts",
                    f"must be non-negative integers [layers, d_ff] = {list(self.active.shape[1:])}, "
                    f"got {c.dtype} {list(c.shape)}", "count activations with Trace.activation_counts()")

    def first(self, n: int) -> "Trace":
        """The first ``n`` tokens (views), with the same predicted and look-ahead sets, profile and meta."""
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return Trace(active=self.active[:n], predicted=cut(self.predicted), meta=self.meta,
                     calibration_counts=self.calibration_counts, lookahead=cut(self.lookahead))

    def activation_counts(self) -> np.ndarray:
        """int32 [layers, d_ff]: how many tokens each neuron fired in. A trace recorded on calibration
        prompts gives another trace its profile: ``other.calibration_counts = calib.activation_counts()``."""
        return self.active.sum(axis=0, dtype=np.int32)

    @property
    def tokens(self) -> int:
        return self.active.shape[0]

    @property
    def n_layers(self) -> int:
        return self.active.shape[1]

    @property
    def d_ff(self) -> int:
        return self.active.shape[2]

    def sparsity(self) -> np.ndarray:
        """Fraction of neurons that do not fire, per layer."""
        return 1.0 - self.active.mean(axis=(0, 2))

    def check_matches(self, spec: ModelSpec) -> None:
        require(self.n_layers == spec.n_layers and self.d_ff == spec.d_ff, "trace",
                f"trace has {self.n_layers} layers x {self.d_ff} neurons but model {spec.name} has "
                f"{spec.n_layers} x {spec.d_ff}", "use a trace recorded or generated for this model")

    def new_neurons_curve(self, windows: Sequence[int]) -> np.ndarray:
        """Mean fraction of neurons per token and layer that are active now but were not active
        in any of the previous k tokens, for each k in ``windows`` (``new_share`` of the active sets)."""
        return new_share(self.active, windows)

    @property
    def read_sets(self) -> np.ndarray:
        """What a policy with ``predictor=trace`` reads: the predicted sets, or the active ones where the trace has
        none (a perfect predictor)."""
        return self.active if self.predicted is None else self.predicted

    # ---- file format ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = dict(self.meta, format_version=FORMAT_VERSION, shape=list(self.active.shape))
        arrays = {"active": np.packbits(self.active, axis=-1), "meta": np.array(json.dumps(meta))}
        for name in ("predicted", "lookahead"):
            if getattr(self, name) is not None:
                arrays[name] = np.packbits(getattr(self, name), axis=-1)
        if self.calibration_counts is not None:
            arrays["calibration_counts"] = self.calibration_counts.astype(np.int32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        require(path.exists(), "trace.path", f"{path} does not exist",
                "give a trace written by Trace.save / real.record, or use trace=synthetic")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                require(meta.get("format_version") == FORMAT_VERSION, "trace.path",
                        f"{path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}",
                        "re-record or re-generate the trace")
                d_ff = meta["shape"][2]
                active = np.unpackbits(z["active"], axis=-1, count=d_ff).astype(bool)
                sets = {name: np.unpackbits(z[name], axis=-1, count=d_ff).astype(bool)
                        for name in ("predicted", "lookahead") if name in z.files}
                counts = z["calibration_counts"] if "calibration_counts" in z.files else None
        except (OSError, ValueError, KeyError, IndexError, EOFError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError("trace.path", f"{path} is not a readable Flashlab trace ({type(e).__name__}: {e})",
                              "give a file written by Trace.save / real.record") from e
        return cls(active=active, predicted=sets.get("predicted"), meta=meta, calibration_counts=counts,
                   lookahead=sets.get("lookahead"))


@dataclass(frozen=True)
class SyntheticTraceConfig:
    tokens: int = 100
    seed: int = 0
    sparsity: float | list[float] = 0.97   # fraction inactive, one value or one per layer
    reuse: float = 0.05                    # P(neuron fires at t+1 | it fires at t)
    rate_skew: float = 0.5                 # lognormal sigma of per-neuron firing rates (0 = uniform)
    coactivation: float = 0.0              # fraction of neurons that copy their cluster leader
    cluster_size: int = 8
    predictor_recall: float = 1.0          # synthetic predictor: share of true actives it finds
    predictor_fp: float = 0.0              # false positives per true active
    predictor_fp_reuse: float = 0.0        # P(a neuron near the threshold stays near it at the next token)
    predictor_fp_duty: float = 1.0         # share of an inactive neuron's near-threshold tokens it is flagged on
    calibration_tokens: int = 0            # tokens run first only to count activations (an offline profile)
    lookahead_recall: float = 0.0          # look-ahead sets: share of each layer's read set (predicted, else active)
                                           # the look-ahead from the layer before also flags; 0 = no look-ahead sets
    lookahead_fp: float = 0.0              # look-ahead flags outside the read set, per neuron of the read set
    lookahead_fp_skew: float = 0.0         # those extras fall on neurons with probability ~ firing rate ** skew
    lookahead_recall_skew: float = 0.0     # a needed neuron is flagged with probability ~ firing rate ** skew (hot
                                           # neurons are easier to foresee), averaging lookahead_recall; 0: uniform

    def __post_init__(self) -> None:
        require(isinstance(self.tokens, int) and self.tokens >= 1, "trace.tokens",
                f"must be an integer >= 1, got {self.tokens!r}", "e.g. tokens=100")
        sp = self.sparsity if isinstance(self.sparsity, (list, tuple)) else [self.sparsity]
        require(all(0.0 <= s < 1.0 for s in sp), "trace.sparsity",
                f"must be in [0, 1), got {self.sparsity!r}", "e.g. trace.sparsity=0.97")
        require(0.0 <= self.reuse < 1.0, "trace.reuse", f"must be in [0, 1), got {self.reuse!r}",
                "e.g. trace.reuse=0.3")
        require(self.rate_skew >= 0, "trace.rate_skew", f"must be >= 0, got {self.rate_skew!r}", "e.g. 1.0")
        require(0.0 <= self.coactivation <= 1.0, "trace.coactivation",
                f"must be in [0, 1], got {self.coactivation!r}", "e.g. trace.coactivation=0.3")
        require(isinstance(self.cluster_size, int) and self.cluster_size >= 1, "trace.cluster_size",
                f"must be an integer >= 1, got {self.cluster_size!r}", "e.g. trace.cluster_size=8")
        require(0.0 < self.predictor_recall <= 1.0, "trace.predictor_recall",
                f"must be in (0, 1], got {self.predictor_recall!r}", "1.0 is a perfect predictor")
        require(self.predictor_fp >= 0, "trace.predictor_fp", f"must be >= 0, got {self.predictor_fp!r}",
                "0.0 means no false positives")
        require(0.0 <= self.predictor_fp_reuse < 1.0, "trace.predictor_fp_reuse",
                f"must be in [0, 1), got {self.predictor_fp_reuse!r}", "0.0: false positives independent per token")
        require(0.0 < self.predictor_fp_duty <= 1.0, "trace.predictor_fp_duty",
                f"must be in (0, 1], got {self.predictor_fp_duty!r}", "1.0: flagged on every near-threshold token")
        require(isinstance(self.calibration_tokens, int) and self.calibration_tokens >= 0,
                "trace.calibration_tokens", f"must be an integer >= 0, got {self.calibration_tokens!r}",
                "e.g. trace.calibration_tokens=512 (0: no activation profile)")
        require(0.0 <= self.lookahead_recall <= 1.0, "trace.lookahead_recall",
                f"must be in [0, 1], got {self.lookahead_recall!r}", "0.0: no look-ahead sets; e.g. 0.93")
        require(self.lookahead_fp >= 0 and (self.lookahead_recall > 0 or self.lookahead_fp == 0),
                "trace.lookahead_fp", f"must be >= 0, and 0 while lookahead_recall is 0 (no look-ahead sets), got "
                f"{self.lookahead_fp!r}", "set trace.lookahead_recall > 0 to generate look-ahead sets")
        require(self.lookahead_fp_skew >= 0, "trace.lookahead_fp_skew",
                f"must be >= 0, got {self.lookahead_fp_skew!r}", "0.0: extras uniform over the neurons")
        require(self.lookahead_recall_skew >= 0, "trace.lookahead_recall_skew",
                f"must be >= 0, got {self.lookahead_recall_skew!r}", "0.0: every needed neuron flagged alike")

    @classmethod
    def from_preset(cls, name: str = "synthetic", **overrides: Any) -> "SyntheticTraceConfig":
        """The knobs of conf/trace/<name>.yaml (a synthetic trace preset), with ``overrides`` (e.g. tokens, seed)."""
        from sim.presets import load_preset
        knobs = {k: v for k, v in load_preset("trace", name).items() if k != "kind"}
        return cls.from_dict({**knobs, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SyntheticTraceConfig":
        """The knobs of ``data``; its ``METADATA_KEYS`` (a paper preset's targets and setting) are ignored."""
        data = {k: v for k, v in data.items() if k not in METADATA_KEYS}
        reject_unknown(cls, data, "trace", "synthetic trace knob")
        if not isinstance(data.get("sparsity", 0.0), (int, float)):
            data["sparsity"] = [float(x) for x in data["sparsity"]]
        return cls(**data)

    def layer_density(self, n_layers: int) -> np.ndarray:
        sp = self.sparsity
        if isinstance(sp, (list, tuple)):
            require(len(sp) == n_layers, "trace.sparsity",
                    f"has {len(sp)} values but the model has {n_layers} layers", "give one value per layer")
            return 1.0 - np.asarray(sp, dtype=float)
        return np.full(n_layers, 1.0 - float(sp))


def neuron_rates(density: float, weights: np.ndarray) -> np.ndarray:
    """Per-neuron firing rates proportional to ``weights``, clipped to [1e-6, 0.95], with mean
    ``density`` (shared with ``sim.trace_fit``, whose closed-form curve must see the same rates)."""
    rate = density * weights / weights.mean()
    for _ in range(20):  # clipping hot neurons lowers the mean: rescale the rest until it holds
        rate = np.clip(rate * density / rate.mean(), 1e-6, 0.95)
    return rate


def near_threshold_share(predictor_fp: float, density: np.ndarray | float, duty: float) -> np.ndarray:
    """Stationary share of neurons near the threshold, fp d / ((1 - d) duty) per layer of density d: an inactive
    neuron there is flagged on a share ``duty`` of its tokens, so false positives per true active average
    ``predictor_fp`` (shared with ``sim.trace_fit``)."""
    d = np.asarray(density, dtype=float)
    return predictor_fp * d / ((1 - d) * duty)


def _predict_in_runs(rng: np.random.Generator, active: np.ndarray, density: np.ndarray,
                     cfg: SyntheticTraceConfig) -> np.ndarray:
    """The synthetic predictor with false positives in runs: per neuron, a two-state chain "near the threshold"
    (stationary share ``near_threshold_share``, stay probability max(``predictor_fp_reuse``, share)); each token an
    active neuron is flagged with probability ``predictor_recall``, an inactive one near the threshold with
    probability ``predictor_fp_duty``."""
    T, L, F = active.shape
    share = near_threshold_share(cfg.predictor_fp, density, cfg.predictor_fp_duty)
    require(float(share.max()) <= 0.95, "trace.predictor_fp_duty",
            f"= {cfg.predictor_fp_duty} needs {100 * share.max():.0f}% of the neurons near the threshold for "
            f"predictor_fp={cfg.predictor_fp}", "raise trace.predictor_fp_duty or lower trace.predictor_fp")
    predicted = np.empty_like(active)
    for l in range(L):
        e = float(share[l])
        stay = max(cfg.predictor_fp_reuse, e)
        wake = e * (1 - stay) / (1 - e)
        near = rng.random(F) < e
        for t in range(T):
            if t:
                u = rng.random(F)
                near = np.where(near, u < stay, u < wake)
            v = rng.random(F)
            predicted[t, l] = np.where(active[t, l], v < cfg.predictor_recall, near & (v < cfg.predictor_fp_duty))
    return predicted


def _scaled(weights: np.ndarray, counts: np.ndarray, mean: float) -> np.ndarray:
    """Probabilities min(1, c * weights) with c such that their mean weighted by ``counts`` is ``mean``."""
    total = float(counts.sum())
    if total <= 0 or mean <= 0:
        return np.zeros_like(weights)
    lo, hi = 0.0, 1.0
    while float((counts * np.minimum(1.0, hi * weights)).sum()) < mean * total and hi < 1e300:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float((counts * np.minimum(1.0, mid * weights)).sum()) < mean * total:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, hi * weights)


def lookahead_sets(needed: np.ndarray, rates: np.ndarray, recall: float, fp: float, skew: float,
                   rng: np.random.Generator, recall_skew: float = 0.0) -> np.ndarray:
    """Synthetic look-ahead sets bool [tokens, layers, d_ff] for ``needed`` (the sets each layer reads): layer 0 gets
    none (nothing runs before it); at layer l >= 1 a needed neuron j is flagged with probability ~ rates[l, j] **
    ``recall_skew`` (averaging ``recall`` over the needed neurons), and a neuron outside the needed set with
    probability ~ rates[l, j] ** ``skew``, so that the extras per token average ``fp`` x the needed neurons per token
    (shared with ``sim.trace_fit.fit_lookahead``, which fits the two skews)."""
    T, L, F = needed.shape
    out = np.zeros_like(needed)
    for l in range(1, L):
        n = needed[:, l]
        r = np.asarray(rates[l], dtype=float)
        hit = _scaled(r ** recall_skew, n.sum(axis=0), recall) if recall_skew > 0 else np.full(F, recall)
        w = r ** skew if skew > 0 else np.ones(F)
        room = float((w * (1.0 - n.mean(axis=0))).sum())          # expected weight outside the needed set per token
        c = fp * float(n.sum(axis=1).mean()) / room if room > 0 else 0.0
        out[:, l] = np.where(n, rng.random((T, F)) < hit, rng.random((T, F)) < np.minimum(c * w, 1.0))
    return out


def generate_trace(spec: ModelSpec, cfg: SyntheticTraceConfig) -> Trace:
    """A synthetic trace for ``spec``: deterministic for ``cfg.seed``.

    ``cfg.calibration_tokens`` > 0: every neuron's chain first runs that many tokens, which are only
    counted (``Trace.calibration_counts``, the profile an offline calibration run of the same model would
    give: same firing rates, other tokens); ``active`` holds the ``cfg.tokens`` that follow."""
    active, predicted, counts, rates = synthetic_sets(spec, cfg)
    lookahead = None
    if cfg.lookahead_recall > 0:     # a stream of its own: every array above is as without look-ahead sets
        lookahead = synthetic_lookahead(cfg, active if predicted is None else predicted, rates)
    meta = {"source": "synthetic", "model": spec.name, "seed": cfg.seed, "knobs": asdict(cfg),
            "n_layers": spec.n_layers, "d_ff": spec.d_ff, "calibration_tokens": cfg.calibration_tokens}
    return Trace(active=active, predicted=predicted, meta=meta, calibration_counts=counts, lookahead=lookahead)


def synthetic_lookahead(cfg: SyntheticTraceConfig, needed: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The look-ahead sets ``generate_trace`` gives for ``cfg`` (its own random stream), from the read sets and the
    neurons' firing rates of ``synthetic_sets``."""
    return lookahead_sets(needed, rates, cfg.lookahead_recall, cfg.lookahead_fp, cfg.lookahead_fp_skew,
                          np.random.default_rng([cfg.seed, 1]), cfg.lookahead_recall_skew)


def synthetic_sets(spec: ModelSpec, cfg: SyntheticTraceConfig) -> tuple[np.ndarray, np.ndarray | None,
                                                                         np.ndarray | None, np.ndarray]:
    """``generate_trace``'s arrays but the look-ahead sets: (active, predicted or None, calibration counts or None,
    each neuron's firing rate [layers, d_ff], which the look-ahead's knobs act on)."""
    rng = np.random.default_rng(cfg.seed)
    T, L, F, C = cfg.tokens, spec.n_layers, spec.d_ff, cfg.calibration_tokens
    density = cfg.layer_density(L)
    active = np.zeros((T, L, F), dtype=bool)
    counts = np.zeros((L, F), dtype=np.int32) if C else None
    rates = np.zeros((L, F))
    for l in range(L):
        a = density[l]
        w = rng.lognormal(0.0, cfg.rate_skew, F) if cfg.rate_skew > 0 else np.ones(F)
        rate = neuron_rates(a, w)
        p_stay = np.maximum(cfg.reuse, rate)                   # P(on | on)
        p_wake = rate * (1 - p_stay) / (1 - rate)              # P(on | off): keeps the stationary rate
        leader = np.arange(F)
        if cfg.coactivation > 0 and cfg.cluster_size > 1:
            perm = rng.permutation(F)                          # clusters of random (non-adjacent) ids
            cluster_of = np.empty(F, dtype=np.int64)
            cluster_of[perm] = np.arange(F) // cfg.cluster_size
            leaders = perm[::cfg.cluster_size]
            follows = rng.random(F) < cfg.coactivation
            leader = np.where(follows, leaders[cluster_of], np.arange(F))
        rates[l] = rate[leader]
        state = rng.random(F) < rate
        for t in range(C + T):
            if t:
                u = rng.random(F)
                state = np.where(state, u < p_stay, u < p_wake)
            if t < C:
                counts[l] += state[leader]
            else:
                active[t - C, l] = state[leader]
    predicted = None
    if cfg.predictor_fp_reuse > 0.0 or cfg.predictor_fp_duty < 1.0:
        predicted = _predict_in_runs(rng, active, density, cfg)
    elif cfg.predictor_recall < 1.0 or cfg.predictor_fp > 0.0:     # independent false positives per token
        keep = rng.random(active.shape) < cfg.predictor_recall
        fp_prob = np.clip(cfg.predictor_fp * density / (1 - density), 0, 1)[None, :, None]
        extra = rng.random(active.shape) < fp_prob
        predicted = (active & keep) | (~active & extra)
    return active, predicted, counts, rates
