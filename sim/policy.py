"""Policy: what to read and keep. Only knobs live here; the decisions are made by ``sim.plan``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sim.errors import reject_unknown, require
from sim.presets import load_preset

PREDICTORS = ("oracle", "trace")
MEM_STRATEGIES = ("preallocated", "concat")
EVICTIONS = ("window", "lru", "lfu", "frequency")
LOOKAHEADS = (0, 1)


@dataclass(frozen=True)
class Policy:
    name: str = "windowing_bundling"
    sparse: bool = True               # False = naive: every non-resident FFN weight is read each token
    predictor: str = "trace"          # trace: the trace's predicted sets (its active ones where it has none: a perfect
                                      # predictor); oracle: its true active sets, whatever its predictor flags
    predictor_rank: int = 128         # low-rank predictor A [d_model, r], B [r, d_ff]; capped at d_model/4
    window: int = 5                   # keep neurons of the last k tokens; 0 = no reuse across tokens
    bundling: bool = True             # up column i and down row i side by side: one read per neuron
    chunk_kib: int = 64               # adjacent neurons are merged into reads up to this size
    memory_budget: float = 0.5        # fraction of the whole model's bytes that may sit in memory
    reads_in_flight: int = 32
    mem_strategy: str = "preallocated"  # the paper's scheme; "concat" rebuilds the matrix (baseline)
    eviction: str = "window"          # window: drop neurons that left the window; lru/lfu/frequency: only when full (lfu: least
                                      # often active outside the window first; frequency: least often active, window or not)
    warm_start: bool = False          # fill the cache at the first token with the neurons the trace's calibration counts
                                      # (an offline activation profile) rank hottest, and start the use counts from them
    lookahead: int = 0                # 1: read a layer's look-ahead set (the trace's, predicted from the layer before's
                                      # input) one layer early, the rest of its needed set late; 0: off (sim.plan)
    coalesce_gap: int = 0             # a read may bridge up to this many unneeded, non-resident neurons between two that
                                      # are read (larger reads, the bridged ones' bytes read too); 0: adjacent ones only

    def __post_init__(self) -> None:
        require(self.predictor in PREDICTORS, "policy.predictor", f"unknown predictor {self.predictor!r}",
                f"use one of {PREDICTORS}")
        require(isinstance(self.window, int) and self.window >= 0, "policy.window",
                f"must be an integer >= 0, got {self.window!r}", "e.g. policy.window=5 (0 disables reuse)")
        require(isinstance(self.chunk_kib, int) and self.chunk_kib >= 4, "policy.chunk_kib",
                f"must be an integer >= 4 KiB, got {self.chunk_kib!r}", "e.g. policy.chunk_kib=64")
        require(isinstance(self.memory_budget, (int, float)) and 0 < self.memory_budget <= 1,
                "policy.memory_budget", f"must be a fraction in (0, 1], got {self.memory_budget!r}",
                "e.g. policy.memory_budget=0.5 for half the model in memory")
        require(isinstance(self.reads_in_flight, int) and self.reads_in_flight >= 1, "policy.reads_in_flight",
                f"must be an integer >= 1, got {self.reads_in_flight!r}", "e.g. policy.reads_in_flight=32")
        require(isinstance(self.warm_start, bool), "policy.warm_start", f"must be true or false, got {self.warm_start!r}",
                "e.g. policy.warm_start=true with policy.eviction=frequency")
        require(not self.warm_start or (self.sparse and self.window > 0 and self.eviction != "window"),
                "policy.warm_start", "needs a cache that keeps neurons beyond the window (sparse, window > 0, eviction "
                f"lru, lfu or frequency), got sparse={self.sparse}, window={self.window}, eviction={self.eviction}",
                "set policy.eviction=frequency (window eviction would drop the preloaded neurons at the next token)")
        require(isinstance(self.predictor_rank, int) and self.predictor_rank >= 1, "policy.predictor_rank",
                f"must be an integer >= 1, got {self.predictor_rank!r}", "e.g. policy.predictor_rank=128")
        require(self.mem_strategy in MEM_STRATEGIES, "policy.mem_strategy",
                f"unknown strategy {self.mem_strategy!r}", f"use one of {MEM_STRATEGIES}")
        require(self.eviction in EVICTIONS, "policy.eviction", f"unknown eviction {self.eviction!r}",
                f"use one of {EVICTIONS}")
        require(isinstance(self.lookahead, int) and not isinstance(self.lookahead, bool) and self.lookahead in LOOKAHEADS,
                "policy.lookahead",
                f"must be one of {LOOKAHEADS} (layers early that the look-ahead reads start), got {self.lookahead!r}; "
                "deeper look-ahead is not implemented", "policy.lookahead=1 (needs a trace with look-ahead sets)")
        require(not self.lookahead or self.sparse, "policy.lookahead",
                "needs a sparse policy (naive reads every weight, there is nothing to predict)",
                "use policy=windowing_bundling, or policy.lookahead=0 with naive")
        require(isinstance(self.coalesce_gap, int) and not isinstance(self.coalesce_gap, bool)
                and self.coalesce_gap >= 0, "policy.coalesce_gap",
                f"must be an integer >= 0 (unneeded neurons a read may bridge), got {self.coalesce_gap!r}",
                "e.g. policy.coalesce_gap=2 with policy.chunk_kib=128")

    @classmethod
    def preset(cls, name: str) -> "Policy":
        return cls.from_dict(load_preset("policy", name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        reject_unknown(cls, data, "policy", "Policy field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_kib * 1024
