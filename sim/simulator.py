"""The SimPy simulator: times the policy engine's plans on a HardwareProfile.

Per layer, the same steps and overlap as the real engine (real/engine.py):

    attention -> predictor -> +-- flash reads of the new neurons, then their copy to the device --+
                              +-- FFN over the active neurons already resident                     |
                              +-- [device] evictions and row moves (they need no new rows) --------+
                           -> [host] evictions and row moves -> inserts -> FFN over the new neurons

With look-ahead plans (``policy.lookahead=1``) layer l+1's early reads enter the flash queue at layer l,
right after layer l's own late reads, once its look-ahead predictor has run on layer l's input; they overlap
layer l's compute and reads, and layer l+1 waits for both its early and its late reads (the late ones queue
behind the early ones). Layer 0's early reads, if a trace has any, enter the queue at the token's start.

Compute ops share one compute lane (a GPU stream or the CPU); reads share the flash device.
A batch of reads costs sum(size / T(size, depth)) from the profile's throughput table (with
``granularity="read"`` every read is its own SimPy process on a ``depth``-slot resource instead:
slower to simulate, used to check the batch model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import simpy

from sim.hardware import GB, HardwareProfile
from sim.layout import Reads
from sim.model_spec import ModelSpec
from sim.plan import LayerPlan, PolicyEngine, predictor_rank
from sim.policy import Policy
from sim.trace import Trace


@dataclass
class TokenCost:
    token: int
    latency_s: float = 0.0
    io_s: float = 0.0          # wall time of the I/O phases (reads + copy to device)
    mem_s: float = 0.0         # memory management (row moves, inserts, bookkeeping)
    compute_s: float = 0.0     # attention, predictor, FFN, head
    bytes: int = 0
    reads: int = 0
    new_neurons: int = 0
    resident_neurons: int = 0


@dataclass
class Event:
    token: int
    layer: int
    lane: str       # "compute" | "flash" | "mem"
    kind: str
    start: float
    end: float


@dataclass
class SimResult:
    tokens: list[TokenCost]
    timeline: list[Event] = field(default_factory=list)

    def summary(self, warmup: int) -> dict[str, float]:
        """Per-token means over tokens after ``warmup`` (all tokens if fewer)."""
        ts = self.tokens[warmup:] if len(self.tokens) > warmup else self.tokens
        mean = lambda f: float(np.mean([f(t) for t in ts]))
        io = mean(lambda t: t.io_s)
        b = mean(lambda t: t.bytes)
        return {
            "latency_ms": mean(lambda t: t.latency_s) * 1e3,
            "io_ms": io * 1e3,
            "mem_ms": mean(lambda t: t.mem_s) * 1e3,
            "compute_ms": mean(lambda t: t.compute_s) * 1e3,
            "bytes_per_token": b,
            "reads_per_token": mean(lambda t: t.reads),
            "gbps": b / io / GB if io > 0 else 0.0,
            "new_neurons_per_token": mean(lambda t: t.new_neurons),
            "resident_neurons": mean(lambda t: t.resident_neurons),
            "measured_tokens": len(ts),
        }


class CostModel:
    """How long each step takes on a profile. Pure functions of sizes: easy to fit and test."""

    def __init__(self, spec: ModelSpec, hw: HardwareProfile, policy: Policy, batch: int = 1):
        self.spec, self.hw, self.policy, self.batch = spec, hw, policy, batch

    def op(self, weight_bytes: float, flops: float) -> float:
        hw = self.hw
        return hw.op_overhead_us * 1e-6 + max(weight_bytes / (hw.compute_gbps * GB), flops / (hw.compute_tflops * 1e12))

    def attention(self, context: int) -> float:
        s = self.spec
        kv = 2 * context * s.kv_heads * s.head_dim * s.dtype_bytes
        w = s.attention_layer_bytes
        return self.op(w + kv, 2 * self.batch * (w / s.dtype_bytes + kv / s.dtype_bytes))

    def predictor(self) -> float:
        if not self.policy.sparse:
            return 0.0
        s, r = self.spec, predictor_rank(self.spec, self.policy)
        w = r * (s.d_model + s.d_ff) * s.dtype_bytes
        return self.op(w, 2 * self.batch * w / s.dtype_bytes)

    def ffn(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        w = rows * self.spec.neuron_bytes
        return self.op(w, 2 * self.batch * w / self.spec.dtype_bytes)

    def head(self) -> float:
        s = self.spec
        w = s.vocab * s.d_model * s.dtype_bytes
        return self.op(w, 2 * self.batch * s.vocab * s.d_model)

    def _rows(self, copied: int, touched: int) -> float:
        """Copy ``copied`` rows (read + write) and do bookkeeping for ``touched`` neurons."""
        if copied == 0 and touched == 0:
            return 0.0
        hw = self.hw
        return (hw.op_overhead_us * 1e-6 + 2 * copied * self.spec.neuron_bytes / (hw.mem_gbps * GB)
                + touched * hw.row_op_us * 1e-6)

    def evict(self, plan: LayerPlan) -> float:
        """Memory management before the new rows exist: drop evicted neurons, move rows into the gaps."""
        return self._rows(plan.rows_copied, plan.rows_copied + plan.evict.size)

    def insert(self, plan: LayerPlan) -> float:
        """Write the newly read rows at the end of the cache matrix."""
        return self._rows(plan.n_inserted, plan.n_inserted)

    def copy_to_device(self, nbytes: int) -> float:
        return nbytes / (self.hw.h2d_gbps * GB) if self.hw.h2d_gbps > 0 and nbytes else 0.0

    def lookahead_predictor(self, layer: int) -> float:
        """Layer ``layer + 1``'s look-ahead predictor, run on layer ``layer``'s input (none after the last layer)."""
        return self.predictor() if self.policy.lookahead and layer + 1 < self.spec.n_layers else 0.0

    def io(self, reads: Reads) -> float:
        """The flash batch, then one copy of everything it read to the device (as the loader does)."""
        if len(reads) == 0:
            return 0.0
        return (self.hw.read_batch_seconds(reads.length, self.policy.reads_in_flight)
                + self.copy_to_device(reads.total_bytes))


def simulate(spec: ModelSpec, hw: HardwareProfile, policy: Policy, trace: Trace | None = None, *,
             plans: Iterable[list[LayerPlan]] | None = None, record_timeline: bool = False,
             granularity: str = "batch", progress=None) -> SimResult:
    """Simulate every token of ``trace`` (or of precomputed ``plans``) and return per-token costs."""
    if plans is None:
        if trace is None:
            raise ValueError("simulate() needs a trace or plans")
        plans = PolicyEngine(spec, policy).plan_trace(trace)
    if granularity not in ("batch", "read"):
        raise ValueError(f"granularity must be 'batch' or 'read', got {granularity!r}")
    cost = CostModel(spec, hw, policy)
    env = simpy.Environment()
    compute = simpy.Resource(env, capacity=1)
    flash = simpy.Resource(env, capacity=policy.reads_in_flight if granularity == "read" else 1)
    result = SimResult(tokens=[])
    log = result.timeline if record_timeline else None
    on_device = hw.h2d_gbps > 0  # the cache lives on an accelerator, reads arrive over a host-to-device copy

    def busy(lane: simpy.Resource, seconds: float, tc: TokenCost, part: str, t: int, l: int, lane_name: str, kind: str):
        with lane.request() as req:
            yield req
            start = env.now
            yield env.timeout(seconds)
            setattr(tc, part, getattr(tc, part) + seconds)
            if log is not None and seconds > 0:
                log.append(Event(t, l, lane_name, kind, start, env.now))

    def one_read(size: int, q: int):
        """One read while q are in flight: the q share the device's T(size, q)."""
        with flash.request() as req:
            yield req
            yield env.timeout(size * q / (float(hw.read_throughput_gbps(size, q)) * GB))

    def io_phase(reads: Reads, tc: TokenCost, t: int, l: int, kind: str = "read"):
        start = env.now
        if granularity == "batch":
            yield from busy(flash, cost.io(reads), tc, "io_s", t, l, "flash", kind)
            return
        if len(reads):
            q = min(policy.reads_in_flight, len(reads))
            yield simpy.AllOf(env, [env.process(one_read(int(s), q)) for s in reads.length])
            yield env.timeout(hw.io_overhead_us * 1e-6 + cost.copy_to_device(reads.total_bytes))
        tc.io_s += env.now - start
        if log is not None and env.now > start:
            log.append(Event(t, l, "flash", kind, start, env.now))

    def start_early(p: LayerPlan, tc: TokenCost, early: dict):
        """Layer p.layer's early reads enter the flash queue now (a look-ahead plan's; nothing otherwise)."""
        if p.n_early_reads:
            early[p.layer] = env.process(io_phase(p.early_reads, tc, p.token, p.layer, "read_early"))

    def token_process(t: int, layer_plans: list[LayerPlan], tc: TokenCost):
        t0 = env.now
        early: dict[int, simpy.Process] = {}            # layer -> its early reads, in the queue since the layer before
        if layer_plans:
            start_early(layer_plans[0], tc, early)
        for i, p in enumerate(layer_plans):
            l = p.layer
            yield from busy(compute, cost.attention(t + 1), tc, "compute_s", t, l, "compute", "attention")
            yield from busy(compute, cost.predictor(), tc, "compute_s", t, l, "compute", "predictor")
            late = env.process(io_phase(p.late_reads if p.n_early_reads else p.reads, tc, t, l))
            if policy.lookahead and i + 1 < len(layer_plans):
                yield from busy(compute, cost.lookahead_predictor(l), tc, "compute_s", t, l, "compute", "lookahead")
                start_early(layer_plans[i + 1], tc, early)
            io = simpy.AllOf(env, [late, early.pop(l)]) if l in early else late
            if hw.overlap:
                yield from busy(compute, cost.ffn(p.resident_active), tc, "compute_s", t, l, "compute", "ffn_resident")
                if on_device:  # the GPU engine queues evictions/moves before the reads land
                    yield from busy(compute, cost.evict(p), tc, "mem_s", t, l, "mem", "evict")
                yield io
            else:
                yield io
                yield from busy(compute, cost.ffn(p.resident_active), tc, "compute_s", t, l, "compute", "ffn_resident")
            if not (hw.overlap and on_device):
                yield from busy(compute, cost.evict(p), tc, "mem_s", t, l, "mem", "evict")
            yield from busy(compute, cost.insert(p), tc, "mem_s", t, l, "mem", "insert")
            yield from busy(compute, cost.ffn(p.n_new_active), tc, "compute_s", t, l, "compute", "ffn_new")
            tc.bytes += p.bytes
            tc.reads += p.n_reads
            tc.new_neurons += int(p.load.size)
            tc.resident_neurons += p.resident
        yield from busy(compute, cost.head(), tc, "compute_s", t, -1, "compute", "head")
        tc.latency_s = env.now - t0

    def run_all():
        for t, layer_plans in enumerate(plans):
            tc = TokenCost(token=t)
            yield env.process(token_process(t, layer_plans, tc))
            result.tokens.append(tc)
            if progress is not None:
                progress.update(1)

    env.process(run_all())
    env.run()
    return result
