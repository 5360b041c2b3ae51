"""The policy engine: the one place that decides what to read, keep and move.

For each token and layer it turns (active set, policy, what is resident) into a ``LayerPlan``:
neurons to load and evict, the reads in the on-flash layout, and the row moves of the paper's
memory manager (a preallocated matrix per layer; evicted rows are filled by moving the last rows
into the gaps; new rows are appended at the end). The simulator times these plans and the real
backend executes them; neither re-decides anything."""

from __future__ import annotations

from dataclasses import dataclass
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


def predictor_bytes(spec: ModelSpec, policy: Policy) -> int:
    return spec.n_layers * predictor_rank(spec, policy) * (spec.d_model + spec.d_ff) * spec.dtype_bytes


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

    @property
    def bytes(self) -> int:
        return self.reads.total_bytes

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

    def plan_token(self, active_per_layer: Sequence[np.ndarray]) -> list[LayerPlan]:
        """``active_per_layer[l]`` is a bool mask [d_ff] of neurons to compute at this token."""
        plans = [self.plan_layer(l, a) for l, a in enumerate(active_per_layer)]
        self.next_token()
        return plans

    def plan_layer(self, layer: int, active: np.ndarray) -> LayerPlan:
        """Plan one layer of the current token. For engines that learn the active set layer by
        layer (an oracle or predictor run on the live hidden state); call ``next_token`` after
        the last layer."""
        return self._plan_layer(self.token, layer, np.asarray(active, dtype=bool))

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
        for t in range(trace.tokens):
            yield self.plan_token(use[t])

    # ---- one layer -----------------------------------------------------------------------
    def _plan_layer(self, t: int, layer: int, active: np.ndarray) -> LayerPlan:
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
        new = np.flatnonzero(active & ~resident)
        if pol.window == 0:
            evict = np.flatnonzero(resident)
            insert = np.zeros(0, np.int64)
        else:
            candidates = resident & ~active                 # never evict what this token needs
            if pol.eviction == "window":
                evict_mask = candidates & (cache.last_used <= t - pol.window)
            else:
                evict_mask = np.zeros_like(candidates)
            kept = int(np.count_nonzero(resident & ~evict_mask))
            room = cache.capacity - kept
            if room < new.size:                             # over budget: drop least recently (lfu: often) used
                extra = np.flatnonzero(candidates & ~evict_mask)
                need = min(new.size - room, extra.size)
                if need > 0:
                    if pol.eviction == "lfu":   # outside the window first, then least often, then least recently active
                        in_window = cache.last_used[extra] > t - pol.window
                        order = np.lexsort((cache.last_used[extra], cache.uses[extra], in_window))
                    elif pol.eviction == "frequency":  # least often, then least recently active
                        order = np.lexsort((cache.last_used[extra], cache.uses[extra]))
                    else:
                        order = np.argsort(cache.last_used[extra], kind="stable")
                    evict_mask[extra[order[:need]]] = True
                    room += need
            evict = np.flatnonzero(evict_mask)
            insert = new[: max(room, 0)]                    # the rest stays transient this token
        moves, copied, rows = cache.evict_and_insert(evict, insert, pol.mem_strategy)
        insert_rows = np.full(new.size, -1, dtype=np.int64)
        insert_rows[: rows.size] = rows
        cache.last_used[active_ids] = t
        cache.uses[active_ids] += 1
        return LayerPlan(
            token=t, layer=layer, active=active_ids, load=new, insert_rows=insert_rows, evict=evict,
            moves=moves, rows_copied=copied, resident=cache.n_rows,
            resident_active=int(active_ids.size - new.size),
            reads=self.layout.reads_for(layer, new, pol.chunk_bytes), dense=False)

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
