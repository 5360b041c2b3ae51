"""The policy engine: the one place that decides what to read, keep and move.

For each token and layer it turns (active set, policy, what is resident) into a ``LayerPlan``:
neurons to load and evict, the reads in the on-flash layout, and the row moves of the paper's
memory manager (a preallocated matrix per layer; evicted rows are filled by moving the last rows
into the gaps; new rows are appended at the end). The simulator times these plans and the real
backend executes them; neither re-decides anything.

Look-ahead (``policy.lookahead=1``, docs/lookahead.md): a layer's look-ahead set (predicted from the layer
before's input) minus what is resident is read one layer early (``LayerPlan.early_load``, the first
``n_early_reads`` of its reads); what the layer's own set still lacks is read late, after its own predictor.
Both enter the cache the same way; early-read neurons the layer turns out not to need are kept only where the
eviction rule would keep them (never at the expense of a needed one). The computed set is the layer's own set
whatever the look-ahead flagged, so the output does not depend on it. ``policy.coalesce_gap`` lets a read
bridge a few unneeded, non-resident neurons (read and dropped: extra bytes for larger reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from sim.errors import ConfigError, require
from sim.layout import FlashLayout, Reads
from sim.model_spec import ModelSpec
from sim.policy import Policy
from sim.trace import Trace


def predictor_rank(spec: ModelSpec, policy: Policy) -> int:
    """The rank actually used: ``policy.predictor_rank``, capped at d_model / 4 (a "low-rank"
    predictor as wide as the layer would cost as much as the FFN it is meant to spare); 0 for naive."""
    if not policy.sparse:
        return 0
    return min(policy.predictor_rank, max(1, spec.d_model // 4))


def n_predictors(spec: ModelSpec, policy: Policy) -> int:
    """Low-rank predictors held in memory: one per layer, and with policy.lookahead one more per layer after the
    first (layer l's look-ahead, run on layer l-1's input)."""
    return spec.n_layers + (spec.n_layers - 1 if policy.lookahead else 0)


def predictor_bytes(spec: ModelSpec, policy: Policy) -> int:
    return n_predictors(spec, policy) * predictor_rank(spec, policy) * (spec.d_model + spec.d_ff) * spec.dtype_bytes


def ffn_cache_neurons(spec: ModelSpec, policy: Policy) -> int:
    """Neurons per layer the memory budget leaves for the FFN cache, after attention,
    embeddings and (for sparse policies) the predictors, which always stay in memory."""
    budget = policy.memory_budget * spec.total_bytes
    fixed = spec.non_ffn_bytes + predictor_bytes(spec, policy)
    if budget < fixed:
        need = fixed / spec.total_bytes
        raise ConfigError("policy.memory_budget",
                          f"{policy.memory_budget:g} of {spec.name} ({budget / 1e9:.2f} GB) does not even hold "
                          f"the weights that must stay in memory ({fixed / 1e9:.2f} GB)",
                          f"raise policy.memory_budget to at least {need:.3f}")
    return int(min(spec.d_ff, (budget - fixed) // (spec.n_layers * spec.neuron_bytes)))


@dataclass(frozen=True)
class LayerPlan:
    token: int
    layer: int
    active: np.ndarray       # neurons whose FFN output is computed this token (sorted); all for naive
    load: np.ndarray         # neurons read from flash (sorted)
    insert_rows: np.ndarray  # cache row of each loaded neuron; -1 = transient (staging buffer only)
    evict: np.ndarray        # neurons dropped from the cache (before the inserts)
    moves: np.ndarray        # int64 [n, 2] (src row, dst row), applied in order before the inserts
    rows_copied: int         # rows the memory manager copies (moves, or every kept row for concat)
    resident: int            # rows in the cache after this token
    resident_active: int     # active neurons that were already resident (computed from the cache)
    reads: Reads
    dense: bool              # naive: compute the whole FFN
    # look-ahead: the neurons of ``load`` read one layer early (sorted), whose reads are ``reads[:n_early_reads]``
    # (issued while the layer before computes); the other reads are the late ones, after this layer's predictor
    early_load: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_early_reads: int = 0

    @property
    def bytes(self) -> int:
        return self.reads.total_bytes

    @property
    def early_reads(self) -> Reads:
        return take_reads(self.reads, slice(0, self.n_early_reads))

    @property
    def late_reads(self) -> Reads:
        return take_reads(self.reads, slice(self.n_early_reads, None))

    @property
    def late_load(self) -> np.ndarray:
        """The neurons of ``load`` the late reads fetch."""
        return np.setdiff1d(self.load, self.early_load, assume_unique=True) if self.early_load.size else self.load

    @property
    def early_bytes(self) -> int:
        return int(self.reads.length[: self.n_early_reads].sum())

    @property
    def n_early_needed(self) -> int:
        """Neurons of this layer's computed set that came from the early reads (look-ahead hits)."""
        return int(np.isin(self.early_load, self.active, assume_unique=True).sum()) if self.early_load.size else 0

    @property
    def n_reads(self) -> int:
        return len(self.reads)

    @property
    def n_new_active(self) -> int:
        """Active neurons that come from this plan's reads (a warm start also reads inactive ones)."""
        return int(self.active.size - self.resident_active)

    @property
    def n_inserted(self) -> int:
        return int(np.count_nonzero(self.insert_rows >= 0))


def take_reads(reads: Reads, sel: slice) -> Reads:
    return Reads(reads.file[sel], reads.offset[sel], reads.length[sel], reads.neuron_start[sel],
                 reads.neuron_count[sel])


def bridge_gaps(ids: np.ndarray, blocked: np.ndarray, max_gap: int, max_run: int) -> np.ndarray:
    """``ids`` (sorted, unique) plus the neurons that reads bridge: walking up from each read's first neuron, the
    next neuron to read joins the read when at most ``max_gap`` neurons lie between (none of them ``blocked``, a bool
    mask over all neurons) and the read then spans at most ``max_run`` neurons; the neurons in between are read too.
    ``FlashLayout.reads_for`` of the result gives exactly those reads (it cuts runs greedily from their start)."""
    ids = np.asarray(ids, dtype=np.int64)
    if max_gap <= 0 or ids.size < 2 or max_run < 3:
        return ids
    gaps = np.diff(ids) - 1
    nblocked = np.concatenate(([0], np.cumsum(blocked, dtype=np.int64)))
    joinable = (gaps <= max_gap) & (nblocked[ids[1:]] == nblocked[ids[:-1] + 1])
    take = np.zeros(gaps.size, dtype=bool)
    edges = np.diff(np.concatenate(([0], joinable.astype(np.int8), [0])))
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):   # chains of joinable links a..b-1
        if ids[b] - ids[a] < max_run:
            take[a:b] = True
            continue
        start = ids[a]
        for i in range(a, b):
            if ids[i + 1] - start < max_run:
                take[i] = True
            else:
                start = ids[i + 1]
    take &= gaps > 0
    if not take.any():
        return ids
    n, lo = gaps[take], ids[:-1][take] + 1
    bridged = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    return np.union1d(ids, bridged)


class LayerCacheState:
    """Torch-free bookkeeping of one layer's neuron cache: which neuron sits in which row."""

    def __init__(self, d_ff: int, capacity: int):
        self.capacity = capacity
        self.row_of = np.full(d_ff, -1, dtype=np.int64)        # neuron -> row, -1 if absent
        self.neuron_at = np.full(max(capacity, 1), -1, dtype=np.int64)
        self.n_rows = 0
        self.last_used = np.full(d_ff, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.uses = np.zeros(d_ff, dtype=np.int64)             # tokens each neuron was active (lfu)

    def resident_mask(self) -> np.ndarray:
        return self.row_of >= 0

    def evict_and_insert(self, evict: np.ndarray, insert: np.ndarray, strategy: str) -> tuple[np.ndarray, int, np.ndarray]:
        """Apply eviction then insertion; return (moves, rows_copied, rows of the inserted)."""
        n = self.n_rows
        gaps = np.sort(self.row_of[evict])
        self.row_of[evict] = -1
        m = n - gaps.size
        if strategy == "preallocated":
            # last rows that survive move into the gaps below the new end
            tail = np.arange(m, n)
            tail = tail[self.neuron_at[tail] >= 0]
            holes = gaps[gaps < m]
            tail = tail[self.row_of[self.neuron_at[tail]] >= 0] if tail.size else tail
            moves = np.stack([tail, holes[: tail.size]], axis=1) if tail.size else np.zeros((0, 2), np.int64)
            rows_copied = int(moves.shape[0])
        else:  # concat: a new matrix holding the kept rows in order, then the new ones
            kept = np.setdiff1d(np.arange(n), gaps, assume_unique=True)
            dst = np.arange(kept.size)
            changed = kept != dst
            moves = np.stack([kept[changed], dst[changed]], axis=1)
            rows_copied = int(kept.size)
        neurons = self.neuron_at[moves[:, 0]] if moves.size else np.zeros(0, np.int64)
        self.neuron_at[gaps] = -1
        if moves.size:
            self.neuron_at[moves[:, 0]] = -1
            self.neuron_at[moves[:, 1]] = neurons
            self.row_of[neurons] = moves[:, 1]
        rows = np.arange(m, m + insert.size)
        self.neuron_at[rows] = insert
        self.row_of[insert] = rows
        self.n_rows = m + insert.size
        return moves.astype(np.int64), rows_copied, rows


class PolicyEngine:
    """Plans every token of a trace under one policy. Stateful: feed tokens in order."""

    def __init__(self, spec: ModelSpec, policy: Policy, calibration_counts: np.ndarray | None = None):
        """``calibration_counts`` (int [layers, d_ff], an offline activation profile; plan_trace takes the
        trace's): what ``policy.warm_start`` preloads and starts the use counts from."""
        self.spec, self.policy = spec, policy
        self.layout = FlashLayout(spec, bundled=policy.bundling)
        self.capacity = ffn_cache_neurons(spec, policy)
        self.caches = [LayerCacheState(spec.d_ff, self.capacity) for _ in range(spec.n_layers)]
        self.token = 0
        self.hot: list[np.ndarray] | None = None          # per layer: the neurons a warm start preloads
        if calibration_counts is not None:
            self._warm(calibration_counts)

    def _warm(self, counts: np.ndarray, source: str = "calibration_counts") -> None:
        """Seed the use counts from an activation profile and choose each layer's preload (its hottest
        neurons, at most the capacity; never-seen ones are not worth a read). ``source`` names where the
        counts came from, for errors."""
        require(self.policy.warm_start, "policy.warm_start",
                f"is false, but {source} were given", "set policy.warm_start=true to use them")
        counts = np.asarray(counts)
        require(counts.shape == (self.spec.n_layers, self.spec.d_ff) and np.issubdtype(counts.dtype, np.integer)
                and (counts.size == 0 or counts.min() >= 0), source,
                f"must be non-negative integers [layers, d_ff] = [{self.spec.n_layers}, {self.spec.d_ff}], "
                f"got {counts.dtype} {list(counts.shape)}",
                "count activations on a trace of this model (Trace.activation_counts)")
        require(self.token == 0, "policy.warm_start", "the cache can be warmed only before the first token",
                "give the calibration counts when the PolicyEngine is built")
        self.hot = []
        for cache, c in zip(self.caches, counts):
            cache.uses[:] = c
            hot = np.argsort(-c.astype(np.int64), kind="stable")[: min(self.capacity, c.size)]
            self.hot.append(np.sort(hot[c[hot] > 0]))

    def plan_token(self, active_per_layer: Sequence[np.ndarray],
                   lookahead_per_layer: Sequence[np.ndarray] | None = None) -> list[LayerPlan]:
        """``active_per_layer[l]`` is a bool mask [d_ff] of neurons to compute at this token;
        ``lookahead_per_layer[l]`` (policy.lookahead) the look-ahead set of layer l, flagged from layer l-1's input."""
        la = lookahead_per_layer if lookahead_per_layer is not None else [None] * len(active_per_layer)
        plans = [self.plan_layer(l, a, q) for l, (a, q) in enumerate(zip(active_per_layer, la))]
        self.next_token()
        return plans

    def plan_layer(self, layer: int, active: np.ndarray, lookahead: np.ndarray | None = None) -> LayerPlan:
        """Plan one layer of the current token. For engines that learn the active set layer by
        layer (an oracle or predictor run on the live hidden state); call ``next_token`` after
        the last layer. ``lookahead``: this layer's look-ahead set (bool [d_ff]; with policy.lookahead=1 its
        non-resident part is read early, ``early_load``; None: nothing early)."""
        return self._plan_layer(self.token, layer, np.asarray(active, dtype=bool),
                                None if lookahead is None else np.asarray(lookahead, dtype=bool))

    def early_load(self, layer: int, lookahead: np.ndarray) -> np.ndarray:
        """The neurons of ``layer`` its look-ahead set makes the engine read early, given the cache now: an engine
        that learns the look-ahead set live (at layer - 1) issues ``reads_for`` of these then; ``plan_layer`` with the
        same set gives the same ``early_load`` (nothing touches this layer's cache in between)."""
        if not (self.policy.lookahead and self.policy.sparse) or (self.hot is not None and self.token == 0):
            return np.zeros(0, np.int64)                 # a warm start's first token reads everything at once
        resident = self.caches[layer].resident_mask()
        return self._cover(np.flatnonzero(np.asarray(lookahead, dtype=bool) & ~resident), resident)

    def reads_for(self, layer: int, neurons: np.ndarray) -> Reads:
        return self.layout.reads_for(layer, neurons, self.policy.chunk_bytes)

    def _cover(self, ids: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        """``ids`` and the neurons ``policy.coalesce_gap`` bridges between them (never a ``blocked`` one)."""
        return bridge_gaps(ids, blocked, self.policy.coalesce_gap,
                           max(1, self.policy.chunk_bytes // self.layout.record_bytes))

    def next_token(self) -> None:
        self.token += 1

    def plan_trace(self, trace: Trace) -> Iterator[list[LayerPlan]]:
        trace.check_matches(self.spec)
        if self.policy.warm_start and self.hot is None:
            require(trace.calibration_counts is not None, "policy.warm_start",
                    "needs the trace's calibration counts (an activation profile), but this trace has none",
                    "generate it with trace.calibration_tokens=512, set trace.calibration_counts on a recorded "
                    "trace (Trace.activation_counts of a calibration trace), or set policy.warm_start=false")
            self._warm(trace.calibration_counts, "trace.calibration_counts")
        use = trace.active if self.policy.predictor == "oracle" else trace.read_sets   # trace: what its predictor flags
        require(not self.policy.lookahead or trace.lookahead is not None, "policy.lookahead",
                "= 1 reads each layer's look-ahead set early, but this trace has no look-ahead sets",
                "use a trace with them (trace.lookahead_recall > 0, e.g. trace=opt-6.7b-paper-lookahead; a recorded "
                "one: python -m real.predictor apply --lookahead-predictor FILE), or set policy.lookahead=0")
        la = trace.lookahead if self.policy.lookahead else None
        for t in range(trace.tokens):
            yield self.plan_token(use[t], None if la is None else la[t])

    # ---- one layer -----------------------------------------------------------------------
    def _plan_layer(self, t: int, layer: int, active: np.ndarray, lookahead: np.ndarray | None = None) -> LayerPlan:
        if not self.policy.sparse:
            return self._plan_naive(t, layer)
        require(not self.policy.warm_start or self.hot is not None, "policy.warm_start",
                "needs calibration counts (an activation profile), none were given",
                "build PolicyEngine(spec, policy, calibration_counts=...) or plan a trace that has them")
        cache, pol = self.caches[layer], self.policy
        resident = cache.resident_mask()
        active_ids = np.flatnonzero(active)
        if self.hot is not None and t == 0 and cache.n_rows == 0:
            return self._plan_warm(t, layer, active_ids)
        early = self.early_load(layer, lookahead) if lookahead is not None else np.zeros(0, np.int64)
        read = resident.copy()
        read[early] = True                                  # resident or already read early
        new = np.flatnonzero(active & ~resident)            # needed and not resident: early hits and late reads
        late = self._cover(np.flatnonzero(active & ~read), read)   # bridged neurons: read and dropped
        prefetched = early[~active[early]]                  # read early, not needed now: kept only by the rule
        if pol.window == 0:
            evict = np.flatnonzero(resident)
            insert = np.zeros(0, np.int64)
        else:
            candidates = resident & ~active                 # never evict what this token needs
            if pol.eviction == "window":
                evict_mask = candidates & (cache.last_used <= t - pol.window)
                prefetched = prefetched[cache.last_used[prefetched] > t - pol.window]
            else:
                evict_mask = np.zeros_like(candidates)
            kept = int(np.count_nonzero(resident & ~evict_mask))
            room = cache.capacity - kept
            if room < new.size + prefetched.size:           # over budget: drop least recently (lfu: often) used
                # the prefetched compete with the evictable resident ones under the rule (on ties they go first)
                extra = np.concatenate((prefetched, np.flatnonzero(candidates & ~evict_mask)))
                need = min(new.size + prefetched.size - room, extra.size)
                if need > 0:
                    if pol.eviction == "lfu":   # outside the window first, then least often, then least recently active
                        in_window = cache.last_used[extra] > t - pol.window
                        order = np.lexsort((cache.last_used[extra], cache.uses[extra], in_window))
                    elif pol.eviction == "frequency":  # least often, then least recently active
                        order = np.lexsort((cache.last_used[extra], cache.uses[extra]))
                    else:
                        order = np.argsort(cache.last_used[extra], kind="stable")
                    drop = extra[order[:need]]
                    evict_mask[drop] = resident[drop]
                    room += int(np.count_nonzero(resident[drop]))
                    prefetched = np.setdiff1d(prefetched, drop, assume_unique=True)
            evict = np.flatnonzero(evict_mask)
            insert = new[: max(room, 0)]                    # the rest stays transient this token
            if prefetched.size:
                insert = np.union1d(insert, prefetched[: max(room - insert.size, 0)])
        load = np.union1d(early, late) if early.size else late
        moves, copied, rows = cache.evict_and_insert(evict, insert, pol.mem_strategy)
        insert_rows = np.full(load.size, -1, dtype=np.int64)
        insert_rows[np.searchsorted(load, insert)] = rows
        cache.last_used[active_ids] = t
        cache.uses[active_ids] += 1
        early_reads, late_reads = self.reads_for(layer, early), self.reads_for(layer, late)
        return LayerPlan(
            token=t, layer=layer, active=active_ids, load=load, insert_rows=insert_rows, evict=evict,
            moves=moves, rows_copied=copied, resident=cache.n_rows,
            resident_active=int(active_ids.size - new.size),
            reads=Reads.concat([early_reads, late_reads]) if early.size else late_reads,
            dense=False, early_load=early, n_early_reads=len(early_reads))

    def _plan_warm(self, t: int, layer: int, active_ids: np.ndarray) -> LayerPlan:
        """The first token of a warm start: read the profile's hottest neurons and this token's active ones;
        the cache keeps the hot ones and, in the rows they leave free (a profile with fewer seen neurons than
        the capacity), the active ones, as a cold start would; the rest of the active stay transient."""
        cache, hot = self.caches[layer], self.hot[layer]
        load = np.union1d(hot, active_ids)
        others = np.setdiff1d(active_ids, hot, assume_unique=True)
        keep = np.union1d(hot, others[: max(0, cache.capacity - hot.size)])
        moves, copied, rows = cache.evict_and_insert(np.zeros(0, np.int64), keep, self.policy.mem_strategy)
        insert_rows = np.full(load.size, -1, dtype=np.int64)
        insert_rows[np.searchsorted(load, keep)] = rows              # in load order, as the cache inserts them
        cache.last_used[active_ids] = t
        cache.uses[active_ids] += 1
        return LayerPlan(
            token=t, layer=layer, active=active_ids, load=load, insert_rows=insert_rows,
            evict=np.zeros(0, np.int64), moves=moves, rows_copied=copied, resident=cache.n_rows,
            resident_active=0, reads=self.layout.reads_for(layer, load, self.policy.chunk_bytes), dense=False)

    def _plan_naive(self, t: int, layer: int) -> LayerPlan:
        """Pinned: neurons [0, capacity) stay resident after the first token; all others are read
        every token in large sequential chunks and discarded."""
        cache, d_ff = self.caches[layer], self.spec.d_ff
        pinned = min(cache.capacity, d_ff)
        if t == 0:
            load = np.arange(d_ff)
            moves, copied, rows = cache.evict_and_insert(np.zeros(0, np.int64), np.arange(pinned),
                                                         self.policy.mem_strategy)
            insert_rows = np.concatenate([rows, np.full(d_ff - pinned, -1, np.int64)])
        else:
            load = np.arange(pinned, d_ff)
            moves, copied = np.zeros((0, 2), np.int64), 0
            insert_rows = np.full(load.size, -1, np.int64)
        return LayerPlan(
            token=t, layer=layer, active=np.arange(d_ff), load=load, insert_rows=insert_rows,
            evict=np.zeros(0, np.int64), moves=moves, rows_copied=copied, resident=cache.n_rows,
            resident_active=d_ff - load.size, reads=self.layout.reads_for(layer, load, self.policy.chunk_bytes),
            dense=True)
