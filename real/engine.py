"""The flash-offloaded inference engine: every FFN layer is served from a converted flash directory
through the policy engine's plans; attention, embeddings and norms stay in memory.

One layer of one token, the same steps and overlap the simulator times (sim/simulator.py):

    attention -> predictor (the active set must reach the host: a sync)
              -> submit the plan's reads (loader threads in C, O_DIRECT)
              -> FFN over the active neurons already resident (+ residual) } overlapped
              -> [GPU] evictions and row moves, bias gather (no host sync) }
              -> wait for the reads, copy them to the device               }
              -> FFN over the new neurons (from the staging rows), added in
              -> [CPU] evictions and row moves; then inserts (nothing this layer waits for)

Two drivers share ``FlashFFN``:

- ``HFFlashModel`` (mode ``model``; ``OPTFlashModel`` is the same class): a Hugging Face ``OPTForCausalLM``
  or ReLU ``LlamaForCausalLM`` of any size whose FFN sites are replaced, so its attention/norm/embedding
  code is HF's own; from a checkpoint directory only the non-FFN weights are loaded
  (``real.hf_checkpoint``). The active set is the oracle's (the exact ReLU mask, from a private copy of
  the up or gate projection that only the oracle uses), a trained ``real.predictor.LowRankPredictor``, or
  given sets (a trace's, for timing); plans are made layer by layer with ``PolicyEngine.plan_layer``.
- ``TraceEngine`` (mode ``trace``): any preset geometry; the plans come from a trace (the ones the
  simulator timed); attention, norms, embeddings, head and predictor are ``SyntheticBody`` random
  weights of the real sizes, so a 7B-class token costs what it would with a checkpoint.

Per-token parts (``sim.simulator.TokenCost``): ``io_s`` = per layer, from submitting the reads until
the last read landed, plus the copy to the device, summed over layers (it overlaps compute, as in
the simulator); ``mem_s`` = memory management (evict, move, insert); ``compute_s`` = attention,
predictor, FFN and head. Parts are device time (CUDA events) on a GPU and wall time on the CPU; in
model mode, where HF's code runs between the FFN sites, ``compute_s`` = latency - mem - the time the
host was blocked waiting for reads."""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from real.flash_dir import FlashDir
from real.flash_reader import aligned_buffer, open_reader
from real.kernels._launch import triton
from real.kernels.add_norm import add_layer_norm
from real.kernels.predictor import predict_active
from real.kernels.sparse_ffn import sparse_ffn, sparse_ffn_reference
from real.neuron_cache import NeuronCache
from sim.layout import ALIGN
from sim.plan import LayerPlan, PolicyEngine
from sim.policy import Policy
from sim.simulator import TokenCost

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from sim.errors import ConfigError
        raise ConfigError("backend.device", "is cuda but torch sees no GPU", "use backend.device=auto or cpu")
    return torch.device(name)


def ffn_rows(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, gate: torch.Tensor | None = None,
             idx: torch.Tensor | None = None, bias: torch.Tensor | None = None, activation: str = "relu",
             impl: str = "auto", down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows r (all, or ``idx``) of act(x . up[r] + bias[r]) down[r] (+ down_bias); gated:
    act(x . gate[r]) (x . up[r]).

    The kernels' fused ``sparse_ffn`` (Triton on CUDA for fp16/bf16); its plain-torch reference
    elsewhere, or everywhere with ``impl="torch"``."""
    if impl == "torch" or not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return sparse_ffn_reference(x, up, down, idx, gate=gate, bias=bias, down_bias=down_bias,
                                    activation=activation)
    return sparse_ffn(x, up, down, idx, gate=gate, bias=bias, down_bias=down_bias, activation=activation,
                      impl="auto")


class Clock:
    """Wall time, and spans of work: CUDA events on a GPU (no host synchronisation, so the host keeps
    queueing work), ``perf_counter`` on the CPU. ``settle`` adds the GPU spans after a sync. Events
    are reused from a pool (creating two per span cost measurable host time per layer)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._open: list = []
        self._free: list = []

    def _event(self):
        if self._free:
            return self._free.pop()
        return torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            e = self._event()
            e.record()
            return e
        return time.perf_counter()

    def stop(self, part: str, start, tc: TokenCost) -> None:
        if self.cuda:
            e = self._event()
            e.record()
            self._open.append((tc, part, start, e))
        else:
            setattr(tc, part, getattr(tc, part) + time.perf_counter() - start)

    def lap(self, part: str, start, tc: TokenCost):
        """``stop`` that also returns the start of the next span (one event, not two, per boundary)."""
        if self.cuda:
            e = self._event()
            e.record()
            self._open.append((tc, part, start, e))
            return e
        now = time.perf_counter()
        setattr(tc, part, getattr(tc, part) + now - start)
        return now

    def settle(self) -> None:
        """Call after a device sync: credit every recorded GPU span to its token's part."""
        done = {}
        for tc, part, a, b in self._open:
            setattr(tc, part, getattr(tc, part) + a.elapsed_time(b) / 1e3)
            done[id(a)], done[id(b)] = a, b     # ``lap`` events close one span and open the next: free once
        self._free += done.values()
        self._open.clear()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self, sync: bool = False) -> float:
        if sync:
            self.sync()
        return time.perf_counter()


class IndexUpload:
    """Host index arrays to device int64 tensors without a host synchronisation.

    ``torch.from_numpy(a).to("cuda")`` copies from pageable memory and then waits until the device
    has finished everything queued before it, so every call stalls the host behind the GPU. Here the
    arrays of one call are packed into one pinned buffer of a small ring and sent with one
    asynchronous copy on the current stream (consumers on that stream see it in order); a slot is
    reused only after its copy is done (an event). On the CPU the arrays are wrapped, not copied."""

    def __init__(self, device: torch.device, capacity: int, slots: int = 8):
        self.device, self.cuda, self.capacity = device, device.type == "cuda", capacity
        self.slot = 0
        if self.cuda:
            self.host = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(slots)]
            self.host_np = [h.numpy() for h in self.host]
            self.dev = [torch.empty(capacity, dtype=torch.int64, device=device) for _ in range(slots)]
            self.done = [None] * slots

    def __call__(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if not self.cuda:
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays]
        total = sum(int(a.size) for a in arrays)
        if total > self.capacity:       # not expected (capacity covers a layer); correct, just slower
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device) for a in arrays]
        k = self.slot
        self.slot = (k + 1) % len(self.host)
        if self.done[k] is not None:
            self.done[k].synchronize()   # this slot's previous copy has left the pinned buffer
        h, out, off = self.host_np[k], [], 0
        for a in arrays:
            h[off: off + a.size] = a
            off += a.size
        d = self.dev[k]
        d[:total].copy_(self.host[k][:total], non_blocking=True)
        if self.done[k] is None:
            self.done[k] = torch.cuda.Event()
        self.done[k].record()
        off = 0
        for a in arrays:
            out.append(d[off: off + a.size])
            off += a.size
        return out


# ---- reads: the storage issue's loader, or the engine's own small reader -------------------------
class SimpleLoads:
    """Plan reads through ``real.flash_reader.FlashReader`` into one staging area; rows on the device."""

    gate = False                     # the host waits for the reads, then copies (no device-side wait)
    pipelines = False                # one staging area: a look-ahead plan's early reads go with its late ones

    def __init__(self, flash: FlashDir, device: torch.device, threads: int, direct: bool):
        spec, layout = flash.spec, flash.layout
        self.spec, self.device, self.cuda = spec, device, device.type == "cuda"
        self.dtype = DTYPES[spec.dtype]
        self.reader = open_reader(flash.ffn_paths, threads, direct)
        self.direct = self.reader.direct
        self.files, self.rec = layout.files_per_layer, layout.record_bytes
        self.slot = spec.d_ff * self.rec                     # staging bytes per file of a layer
        nbytes = self.files * self.slot
        if self.cuda:                                         # pinned, aligned host staging + device staging
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
            skip = (-raw.data_ptr()) % ALIGN
            self.host = raw[skip: skip + nbytes]
            self.host_np = self.host.numpy()
            self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.copied = torch.cuda.Event()
        else:
            self.host_np = aligned_buffer(nbytes)
            self.host = torch.from_numpy(self.host_np)
            self.dev = self.host

    def submit(self, plan: LayerPlan):
        if self.cuda:
            self.copied.synchronize()     # the previous layer's copy out of staging is done
        pos = np.searchsorted(plan.load, plan.reads.neuron_start)
        which = plan.reads.file.astype(np.int64) - plan.layer * self.files
        t = time.perf_counter()
        return (t, plan.load.size, self.reader.submit(plan.reads, self.host_np, which * self.slot + pos * self.rec))

    def gated(self, pending) -> bool:
        return False

    def wait_reads(self, pending) -> tuple[float, float]:
        return pending[0], pending[2].wait()

    def rows(self, pending) -> torch.Tensor:
        """The staged neurons as [n, width] rows on the device, in ``plan.load`` order."""
        n = pending[1]
        if self.cuda:
            for m in range(self.files):
                a = m * self.slot
                self.dev[a: a + n * self.rec].copy_(self.host[a: a + n * self.rec], non_blocking=True)
            self.copied.record()
        if self.files == 1:
            return self.dev[: n * self.rec].view(n, self.rec)[:, : self.spec.neuron_bytes].view(self.dtype)
        nb = self.spec.d_model * self.spec.dtype_bytes
        return torch.cat([self.dev[m * self.slot: m * self.slot + n * self.rec].view(n, self.rec)[:, :nb]
                          .view(self.dtype) for m in range(self.files)], dim=1)

    def close(self) -> None:
        self.reader.close()


# a layer's reads go to the loader as this many jobs, each finished job's rows copied to the device while
# the later jobs' reads are in flight (gated: each job's copy queued behind a wait on its own flag). 1 by
# measurement: on the H100 machine 3 jobs cut the host time after the last read by ~70 us per layer but the
# token was not faster (2026-11-23 16:11 UTC, engine_profile_run4.txt, in git history at cd7dc41); gated, 3 jobs against 1
# in three interleaved rounds: 222 / 241 / 267 against 246 / 230 / 259 ms per token, no consistent
# difference within the disk's drift (17:29 UTC, benchmarks/validation/engine_runs/engine-chunks2.json)
COPY_CHUNKS = 1
# GPU, native reader threads: queue the copy of a layer's new rows and the FFN over them before the reads
# end, behind a device-side wait on a flag the reader threads set (real/kernels/wait_flag.py). On by
# measurement: full OPT-6.7B, H100, 2026-11-23 16:37 UTC, two interleaved rounds (engine-gated.txt, in git history at cd7dc41):
# 267.0 / 276.7 ms per token against 297.0 / 298.4 with the host waiting first
GATE_READS = True


class LoaderLoads:
    """The storage issue's ``real.loader.FlashLoader`` behind the same three calls."""

    pipelines = True                 # can hold a layer's early reads while the layer before runs (slots)

    def __init__(self, flash: FlashDir, device: torch.device, threads: int, direct: bool,
                 read_threads: str | None = None, copy_chunks: int = COPY_CHUNKS, gate: bool = GATE_READS,
                 slots: int = 2):
        from real.loader import FlashLoader
        self.loader = FlashLoader(flash, device=str(device), depth=threads, direct=direct, side_stream=False,
                                  read_threads=read_threads, copy_chunks=copy_chunks, slots=slots)
        self.direct = self.loader.direct
        self.gate = gate and self.loader.can_gate()

    def submit(self, plan: LayerPlan):
        return self.loader.submit(plan.layer, plan.reads, plan.load, gate=self.gate)

    def submit_part(self, layer: int, reads, neurons: np.ndarray):
        """One part of a layer's reads (a look-ahead plan's early or late reads), rows in ``neurons`` order."""
        return self.loader.submit(layer, reads, neurons, gate=self.gate)

    def gated(self, pending) -> bool:
        return self.gate and self.loader.gated(pending)

    def queue_rows(self, pending, clock: "Clock", st: TokenCost) -> torch.Tensor:
        """Queue (no host wait) per read chunk a device wait for its reads and its copy; the last chunk's
        copy is timed as io (the others are assumed to overlap the reads, which are timed whole: where the
        reads ended before the copies were queued, io is undercounted by their copies)."""
        return self.loader.queue_copy(pending, (clock.start, lambda s: clock.stop("io_s", s, st)))

    def check(self) -> None:
        if self.gate:
            self.loader.check_gate()

    def wait_reads(self, pending) -> tuple[float, float]:
        """The reads are done, and all but the last chunk already on their way to the device (gated
        loads: all chunks, queued by ``queue_rows``)."""
        return self.loader.wait_reads(pending)

    def rows(self, pending) -> torch.Tensor:
        return self.loader.wait(pending)

    def close(self) -> None:
        self.loader.close()


LOADERS = ("auto", "loader", "simple")


def open_loads(flash: FlashDir, device: torch.device, threads: int, direct: bool, loader: str = "auto",
               read_threads: str | None = None, copy_chunks: int = COPY_CHUNKS, gate: bool = GATE_READS,
               slots: int = 2):
    """``loader``: "loader" = real.loader.FlashLoader, "simple" = real.flash_reader, "auto" = the
    former where it imports, else the latter. ``read_threads``: the FlashLoader's reader threads
    (python | native; None = FLASHLAB_READ_THREADS or native). ``copy_chunks``: the FlashLoader's
    (a layer's reads in that many jobs, each copied to the device once done; 1 = one copy at the end);
    ``gate``: see GATE_READS (where the loader can: a GPU and native reader threads)."""
    if loader not in LOADERS:
        raise ValueError(f"backend.loader: unknown {loader!r}; use one of {LOADERS}")
    if loader in ("auto", "loader"):
        try:
            return LoaderLoads(flash, device, threads, direct, read_threads, copy_chunks, gate, slots)
        except ImportError:
            if loader == "loader":
                raise
    return SimpleLoads(flash, device, threads, direct)


class FlashFFN:
    """All FFN layers of one model, served from a flash directory through plans."""

    def __init__(self, flash: FlashDir, capacity: int, *, strategy: str = "preallocated",
                 device: torch.device | str = "cpu", threads: int = 32, direct: bool = True,
                 up_bias: list[torch.Tensor] | None = None, down_bias: list[torch.Tensor] | None = None,
                 kernel: str = "auto", loader: str = "auto", read_threads: str | None = None,
                 copy_chunks: int = COPY_CHUNKS, gate_reads: bool = GATE_READS, defer_insert: bool = False,
                 pipeline: bool = False):
        spec, layout = flash.spec, flash.layout
        self.flash, self.spec, self.layout = flash, spec, layout
        self.device = torch.device(device)
        self.clock = Clock(self.device)
        self.dtype = DTYPES[spec.dtype]
        self.d, self.n_mat = spec.d_model, spec.ffn_matrices
        self.width = self.n_mat * self.d
        self.activation, self.kernel = spec.activation, kernel
        # GPU: index arrays go up through pinned memory, no host sync
        self.upload = IndexUpload(self.device, 4 * spec.d_ff + 2 * capacity + 16)
        self.caches = [NeuronCache(spec.d_ff, capacity, self.width, self.dtype, self.device, strategy, self.upload)
                       for _ in range(spec.n_layers)]
        self.marks: list | None = None      # (label, perf_counter) per phase when set (profiling)
        self.mark_sync = False              # sync the device before each mark (GPU completion times)
        # ``pipeline`` (look-ahead plans, policy.lookahead): layer l+1's early reads go to the loader while layer l
        # runs, so the loader holds this layer's early and late loads, the next layer's early load and the rows of the
        # load before, which a deferred insert may still read (4 slots; 2 otherwise)
        self.loads = open_loads(flash, self.device, threads, direct, loader, read_threads, copy_chunks,
                                gate_reads, slots=4 if pipeline else 2)
        self.loads_gated = self.loads.gate
        self.pipeline = pipeline and self.loads.pipelines
        self._early: tuple | None = None    # (token, layer, pending load) of the next layer's early reads
        self._merged: list = [None, None]   # per layer parity: a layer's new rows, early and late, in load order
        self._io_until = 0.0                # reads in flight are counted once where loads overlap
        self._open: dict = {}               # submitted loads whose rows were not taken yet: drained on an error
        # a layer's cache insert queued after the next layer's reads are submitted (GPU, FlashLoader: the new
        # rows stay in the load's slot until the slot after next is loaded, which the insert is queued before)
        self.defer_insert = defer_insert and self.clock.cuda and isinstance(self.loads, LoaderLoads)
        self._deferred: tuple | None = None
        gated = self.n_mat == 3
        mk = lambda n: torch.zeros(n, dtype=self.dtype, device=self.device)  # noqa: E731
        self.b1 = None if gated else [(b.to(self.device, self.dtype) if up_bias is not None else mk(spec.d_ff))
                                      for b in (up_bias or [None] * spec.n_layers)]
        self.b2 = [b.to(self.device, self.dtype) for b in down_bias] if down_bias is not None else None
        self.stats = TokenCost(token=-1)
        self.io_wait_s = 0.0

    def close(self) -> None:
        self._drain_open()
        self.loads.close()

    def _submit(self, load):
        self._open[id(load)] = load
        return load

    def _rows(self, load):
        """The load's rows (waits for its reads); it no longer holds its loader slot."""
        self._open.pop(id(load), None)
        return self.loads.rows(load)

    def _drain_open(self) -> None:
        """Give back the slot of every load not taken (an error mid-layer, an early load nobody ran): their reads
        finish, their rows are dropped, so the loader never runs out of slots."""
        self._early = None
        for load in list(self._open.values()):
            with contextlib.suppress(Exception):
                self.loads.rows(load)
        self._open.clear()

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def end_token(self) -> None:
        """After the token's final sync: raise if a device wait for reads gave up polling (gated reads)."""
        if self._early is not None:          # an early load for a layer that did not run this token
            self._drain_open()
        if self.loads_gated:
            self.loads.check()

    def begin_token(self, t: int) -> TokenCost:
        self.stats = TokenCost(token=t)
        self.io_wait_s = 0.0
        return self.stats

    # ---- pieces ----------------------------------------------------------------------------
    def _views(self, m: torch.Tensor) -> tuple:
        d = self.d
        parts = [m[:, i * d:(i + 1) * d] for i in range(self.n_mat)]
        return (parts[0], parts[1], parts[2]) if self.n_mat == 3 else (None, parts[0], parts[1])

    def _ffn(self, x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None,
             idx: torch.Tensor | None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
        gate, up, down = self._views(rows)
        return ffn_rows(x, up, down, gate=gate, idx=idx, bias=bias, activation=self.activation, impl=self.kernel,
                        down_bias=down_bias)

    def _await_reads(self, pending, st: TokenCost) -> None:
        """Block until ``pending``'s reads are done (their errors raise); count the wait and the reads."""
        t_wait = time.perf_counter()
        t_submit, t_done = self.loads.wait_reads(pending)
        self.io_wait_s += time.perf_counter() - t_wait
        st.io_s += max(0.0, t_done - max(t_submit, self._io_until))    # an early load overlaps the one before
        self._io_until = max(self._io_until, t_done)

    def flush_insert(self) -> None:
        """Queue the cache insert that ``defer_insert`` held back (before the caches are read or checked, and
        at the end of every token: the caches then match the policy engine between tokens)."""
        if self._deferred is not None:
            args, self._deferred = self._deferred, None
            self._insert(*args, self.clock.start(), self.stats)

    def _insert_or_defer(self, cache: NeuronCache, plan: LayerPlan, rows, bias, keep_sel, span, st) -> None:
        if self.defer_insert:
            self.clock.stop("mem_s", span, st)
            self._deferred = (cache, plan, rows, bias, keep_sel)
        else:
            self._insert(cache, plan, rows, bias, keep_sel, span, st)

    def _insert(self, cache: NeuronCache, plan: LayerPlan, rows, bias, keep_sel, span, st: TokenCost) -> None:
        """The plan's memory management after the reads (on the CPU the evictions too), timed as mem from
        ``span``."""
        if not self.clock.cuda:
            cache.evict(plan)
        cache.insert(plan, rows, bias, keep_sel)
        self.clock.stop("mem_s", span, st)
        self.mark("insert")

    # ---- one layer -------------------------------------------------------------------------
    def mark(self, label: str) -> None:
        if self.marks is not None:
            if self.mark_sync:
                self.clock.sync()
            self.marks.append((label, time.perf_counter()))

    def _take_early(self, plan: LayerPlan):
        """The early load submitted for ``plan`` while the layer before ran, or None (then ``plan``'s reads,
        early and late, go to the loader together, as in an engine without look-ahead)."""
        early, self._early = self._early, None
        if early is None:
            return None
        token, layer, pending = early
        if (token, layer) == (plan.token, plan.layer):
            return pending
        with contextlib.suppress(Exception):       # not this plan's (a caller skipped a layer): drain, drop
            self._rows(pending)
        return None

    def _prefetch(self, next_plan: LayerPlan | None) -> None:
        """Layer l+1's early reads (its look-ahead set, not resident) to the loader, behind layer l's late ones."""
        if next_plan is not None and self.pipeline and next_plan.n_early_reads:
            self._early = (next_plan.token, next_plan.layer, self._submit(
                self.loads.submit_part(next_plan.layer, next_plan.early_reads, next_plan.early_load)))
            self.mark("prefetch")

    def _merge_rows(self, layer: int, n: int) -> torch.Tensor:
        """A [n, width] buffer for a layer's new rows in load order (two, by layer parity: a deferred insert
        reads the layer before's while this one is filled); d_ff rows, allocated at first use."""
        if self._merged[layer % 2] is None:
            self._merged[layer % 2] = torch.empty(self.spec.d_ff, self.width, dtype=self.dtype, device=self.device)
        return self._merged[layer % 2][:n]

    def run_layer(self, plan: LayerPlan, x: torch.Tensor, residual: torch.Tensor | None = None,
                  next_plan: LayerPlan | None = None) -> torch.Tensor:
        try:
            return self._run_layer(plan, x, residual, next_plan)
        except BaseException:
            self._drain_open()          # a read error (or any other) must not leave loader slots taken
            raise

    def _run_layer(self, plan: LayerPlan, x: torch.Tensor, residual: torch.Tensor | None,
                   next_plan: LayerPlan | None) -> torch.Tensor:
        """Execute ``plan`` for FFN input ``x`` [n, d_model]; returns the FFN output [n, d_model]
        (plus ``residual`` if given: one addition fewer after the reads).

        The reads are submitted first: they are the critical path. With look-ahead plans, only the late ones
        (the early ones were submitted while the layer before ran), then ``next_plan``'s early reads, so the
        disk stays busy across the layer boundary. While they are in flight the
        host queues the FFN over the resident neurons (with the down bias and the residual added),
        the bias gather of the loaded neurons and, on a GPU, the evictions/moves (they need no new
        rows; index arrays go up through pinned memory, so nothing here waits for the device). Then
        it waits (helping with the reads), copies the rows to the device, runs the FFN over the new
        neurons (from the staging rows: the layer's output needs nothing else) and only then inserts
        them into the cache (CPU: evicts first), so the insert's host time is off the critical path."""
        l, st, clock = plan.layer, self.stats, self.clock
        cache, load, gpu = self.caches[l], plan.load, self.clock.cuda
        self.mark("plan")
        early = self._take_early(plan)
        if early is not None:
            late = plan.late_load
            pending = self._submit(self.loads.submit_part(l, plan.late_reads, late)) if late.size else None
        else:
            pending = self._submit(self.loads.submit(plan)) if load.size else None
        self.mark("submit")
        self._prefetch(next_plan)
        self.flush_insert()          # the previous layer's (one layer: its own), while these reads fly
        res = np.setdiff1d(plan.active, load, assume_unique=True) if load.size else plan.active
        b2 = self.b2[l] if self.b2 is not None else None
        y = residual
        s = clock.start()
        if res.size:
            rows = cache.rows_for(res)
            if rows.size == cache.n_rows and rows[0] == 0 and rows[-1] == rows.size - 1 and \
                    np.array_equal(rows, np.arange(rows.size)):
                y_res = self._ffn(x, cache.view(), cache.bias[: cache.n_rows] if self.b1 is not None else None,
                                  None, b2)
            else:
                idx, = self.upload(rows)
                y_res = self._ffn(x, cache.data, cache.bias if self.b1 is not None else None, idx, b2)
            b2 = None                                        # added once
            y = y_res if y is None else y + y_res
            s = clock.lap("compute_s", s, st)
        self.mark("ffn_resident")
        if gpu:
            cache.evict(plan)
        new_bias, keep_sel, new_idx, up = None, None, None, {}
        if load.size:
            # index arrays the post-read steps need go up now, in one copy, while the reads fly: the loaded
            # neurons' bias rows, which loaded rows the cache keeps (if not all), which are active (if not
            # all: a warm start also reads neurons only to keep them), where early and late rows go (look-ahead)
            kept = plan.insert_rows >= 0
            named = {"bias": load if self.b1 is not None else None,
                     "keep": None if kept.all() else np.flatnonzero(kept),
                     "active": None if plan.n_new_active == load.size else
                     np.flatnonzero(np.isin(load, plan.active, assume_unique=True)),
                     "early_at": None if early is None else np.searchsorted(load, plan.early_load),
                     "late_at": None if early is None or pending is None else np.searchsorted(load, plan.late_load)}
            named = {k: v for k, v in named.items() if v is not None}
            up = dict(zip(named, self.upload(*named.values()))) if named else {}
            if "bias" in up:
                new_bias = self.b1[l].index_select(0, up["bias"])
            keep_sel, new_idx = up.get("keep"), up.get("active")
        if gpu:
            clock.stop("mem_s", s, st)
        self.mark("evict")
        assemble = lambda r: r                               # noqa: E731 -- the load's rows are the new rows
        if early is not None:
            # the early rows (read while the layer before ran) into their places among the layer's new rows;
            # the late rows, when they come, into theirs
            self._await_reads(early, st)
            s = clock.start()
            merged = self._merge_rows(l, load.size)
            merged.index_copy_(0, up["early_at"], self._rows(early))
            clock.stop("mem_s", s, st)                       # a copy within the device (its H2D copy queued too)
            self.mark("early")
            assemble = lambda r: merged.index_copy_(0, up["late_at"], r)  # noqa: E731
        if not load.size:
            self._insert(cache, plan, None, None, None, clock.start(), st)
        elif pending is None:                                # every new row came early
            s = clock.start()
            y_new = self._ffn(x, merged, new_bias, new_idx, b2)
            b2 = None
            y = y_new if y is None else y + y_new
            self._insert_or_defer(cache, plan, merged, new_bias, keep_sel, clock.lap("compute_s", s, st), st)
        elif self.loads.gated(pending):
            # the device waits for the reads itself (a flag the reader threads set), so the copy and the
            # FFN over the new rows are queued now; the host then waits for the reads (errors, accounting)
            late_rows = self.loads.queue_rows(pending, clock, st)   # on an error run_layer gives its slot back
            self.mark("copy")
            s = clock.start()
            new_rows = assemble(late_rows)
            if early is not None:
                s = clock.lap("mem_s", s, st)
            y_pre, b2_new = y, b2
            y_new = self._ffn(x, new_rows, new_bias, new_idx, b2)
            b2 = None
            y = y_new if y is None else y + y_new
            clock.stop("compute_s", s, st)
            self.mark("ffn_new")
            self._await_reads(pending, st)
            rows_now = self._rows(pending)                   # no copy, unless reads were completed late
            if pending.refetched:                            # then the queued FFN saw them unfinished
                new_rows = assemble(rows_now)
                y_new = self._ffn(x, new_rows, new_bias, new_idx, b2_new)
                y = y_new if y_pre is None else y_pre + y_new
            self.mark("wait")
            self._insert_or_defer(cache, plan, new_rows, new_bias, keep_sel, clock.start(), st)
        else:
            self._await_reads(pending, st)
            self.mark("wait")
            s = clock.start()
            new_rows = assemble(self._rows(pending))         # to the device
            s = clock.lap("io_s", s, st)
            self.mark("copy")
            # the new neurons' FFN first: the layer's output needs it, the cache insert can follow
            y_new = self._ffn(x, new_rows, new_bias, new_idx, b2)
            b2 = None
            y = y_new if y is None else y + y_new
            s = clock.lap("compute_s", s, st)
            self.mark("ffn_new")
            self._insert_or_defer(cache, plan, new_rows, new_bias, keep_sel, s, st)
        if y is None:
            y = torch.zeros_like(x)
        if b2 is not None:
            y = y + b2
        st.bytes += plan.bytes
        st.reads += plan.n_reads
        st.new_neurons += int(load.size)
        st.resident_neurons += plan.resident
        return y


# ---- trace-driven mode ----------------------------------------------------------------------------
class SyntheticBody:
    """Everything but the FFN for a geometry: embeddings, per-layer pre-norm attention with a KV cache,
    the FFN pre-norm, the low-rank predictor and the LM head, with random weights. Real matmuls of
    the real sizes, so the per-token compute is a checkpoint's; the values mean nothing.

    ``front`` (attention + FFN norm + predictor of one layer) runs on a GPU as one CUDA graph per
    layer (``graphs=True``): launching its ~15 kernels one by one from Python cost ~0.5-0.9 ms of
    host time per layer on the H100 machine, against ~0.13 ms for a replay. A graph has fixed
    shapes, so the graphed attention runs over all ``max_tokens`` key slots with the unwritten ones
    masked (same result; the extra keys cost ~1 MB of reads per layer at 64 tokens, against 134 MB
    of weights); the position is a device tensor, written once per token.

    ``kernel="auto"`` runs the project's kernels where they compile (CUDA, fp16/bf16, Triton installed): the
    attention's residual add and the FFN norm as one fused add + LayerNorm, and the predictor as
    ``predict_active`` (device index list, no host sync), both with programmatic dependent launch on Hopper;
    ``"torch"`` (and the CPU) keeps plain torch: addmm + layer_norm, (x A) B > 0.
    ``benchmarks/bench_body.py`` times one against the other."""

    def __init__(self, spec, device: torch.device, max_tokens: int, predictor_rank: int = 0, seed: int = 0,
                 graphs: bool = True, kernel: str = "auto", lookahead: bool = False):
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel: unknown value {kernel!r}. Fix: use 'auto' (the Triton kernels on CUDA) "
                             "or 'torch'")
        self.spec, self.device = spec, device
        self.graphs = graphs and torch.device(device).type == "cuda"
        # the project's kernels (fused add + LayerNorm, the device predictor) where they compile: CUDA, fp16/bf16
        self.fused = kernel == "auto" and torch.device(device).type == "cuda" and spec.dtype != "float32" \
            and triton is not None
        self._pdl = self.fused and torch.cuda.get_device_capability(device) >= (9, 0)
        self._graph: dict = {}
        self._pos = torch.zeros(1, dtype=torch.int64, device=device)
        self._pos_value = -1
        self.predicted = None          # the last front's predictor output (tests, benchmarks)
        self._slots = torch.arange(max_tokens, device=device)
        dt = DTYPES[spec.dtype]
        g = torch.Generator(device=device).manual_seed(seed)
        d, kv = spec.d_model, spec.kv_heads * spec.head_dim
        rnd = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * 0.02).to(dt)  # noqa
        self.emb = rnd(spec.vocab, d)
        self.wqkv = [rnd(d, d + 2 * kv) for _ in range(spec.n_layers)]
        self.wo = [rnd(d, d) for _ in range(spec.n_layers)]
        # keys and values of a layer side by side, so one copy stores both per token
        self.kv_cache = torch.zeros(spec.n_layers, 2, spec.kv_heads, max_tokens, spec.head_dim, dtype=dt,
                                    device=device)
        self.pred = [(rnd(d, predictor_rank), rnd(predictor_rank, spec.d_ff)) for _ in range(spec.n_layers)] \
            if predictor_rank else None
        # policy.lookahead: layer l also predicts layer l+1's set from its FFN input (one more predictor of the
        # same rank per layer but the last), in the same graph, so its cost lands where a real one's would
        self.la_pred = [(rnd(d, predictor_rank), rnd(predictor_rank, spec.d_ff)) for _ in range(spec.n_layers - 1)] \
            if predictor_rank and lookahead else None
        self.kv = kv
        if self.fused:
            self._try_kernels()

    def _try_kernels(self) -> None:
        """Compile (and tune) the body's kernels once now; if either cannot run here (an older Triton, an
        unsupported GPU), warn and keep plain torch rather than fail mid-run."""
        try:
            x = torch.zeros(1, self.spec.d_model, dtype=self.emb.dtype, device=self.device)
            add_layer_norm(x, x, pdl=self._pdl)
            if self.pred is not None:
                predict_active(x, *self.pred[0], 0.0, pdl=self._pdl)
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 -- torch is correct, only slower
            import warnings
            warnings.warn(f"the body's Triton kernels failed ({type(e).__name__}: {e}); using torch (addmm + "
                          "layer_norm, (x A) B > 0)", RuntimeWarning, stacklevel=3)
            self.fused = self._pdl = False

    @property
    def nbytes(self) -> int:
        ts = [self.emb, *self.wqkv, *self.wo] + [t for ps in (self.pred, self.la_pred) if ps for ab in ps for t in ab]
        return sum(t.numel() * t.element_size() for t in ts)

    def embed(self, token: int) -> torch.Tensor:
        return self.emb[token % self.spec.vocab].unsqueeze(0)

    def attention(self, l: int, h: torch.Tensor, pos) -> torch.Tensor:
        """h + attention(h) @ wo in plain torch, the reference: ``pos`` as in ``_mix`` (an int slices the key
        slots; an int64 [1] device tensor keeps the shapes fixed, as the CUDA graph runs it)."""
        return torch.addmm(h, self._mix(l, h, pos), self.wo[l])          # h + o @ wo in one launch

    def _mix(self, l: int, h: torch.Tensor, pos) -> torch.Tensor:
        """Attention's mixed heads (before wo), writing this token's key and value into slot ``pos``. An int
        ``pos`` attends to the written slots only (eager); an int64 [1] device tensor keeps every shape fixed
        for a CUDA graph: all slots are attended to, those after ``pos`` masked out."""
        s, d = self.spec, self.spec.d_model
        qkv = F.layer_norm(h, (d,)) @ self.wqkv[l]
        q = qkv[:, :d].view(s.n_heads, 1, s.head_dim)
        kv_new = qkv[0, d:].view(2, s.kv_heads, 1, s.head_dim)
        if isinstance(pos, torch.Tensor):
            self.kv_cache[l].index_copy_(2, pos, kv_new)
            k, v = self.kv_cache[l, 0], self.kv_cache[l, 1]
            mask = (self._slots <= pos).view(1, 1, -1)
        else:
            self.kv_cache[l, :, :, pos : pos + 1] = kv_new
            k, v = self.kv_cache[l, 0, :, : pos + 1], self.kv_cache[l, 1, :, : pos + 1]
            mask = None
        if s.kv_heads != s.n_heads:
            rep = s.n_heads // s.kv_heads
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(1, d)

    def _attend_and_norm(self, l: int, h: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + o @ wo, the FFN input): with the project's kernels o @ wo, then one fused add + LayerNorm
        launch (the sum rounded to the dtype, normalised in fp32); h may differ from addmm's by that one extra
        rounding of o @ wo. Else addmm + layer_norm."""
        if self.fused:
            x, h = add_layer_norm(o @ self.wo[l], h, pdl=self._pdl)
            return h, x
        h = torch.addmm(h, o, self.wo[l])
        return h, self.ffn_input(l, h)

    def front(self, l: int, h: torch.Tensor, pos: int, sparse: bool,
              lookahead: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention, FFN input norm and (``sparse``) the predictor of layer ``l``: (h after attention,
        FFN input). On a GPU the returned tensors are the layer's graph outputs, valid until its next
        replay (the next token), which the device stream orders after every use of them. The predictor's
        output (see ``predictor``; None when not ``sparse``) is left in ``self.predicted``, as valid; with
        ``lookahead`` (a body built with ``lookahead=True``) it is (this layer's, layer l+1's look-ahead)."""
        if self.graphs:
            try:
                return self._front_graphed(l, h, pos, sparse, lookahead)
            except Exception as e:  # noqa: BLE001 -- correct without graphs, only slower
                import warnings
                warnings.warn(f"CUDA graph of the attention failed ({type(e).__name__}: {e}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
                self.graphs = False
        h, x, self.predicted = self.front_eager(l, h, pos, sparse, lookahead)
        return h, x

    def front_eager(self, l: int, h: torch.Tensor, pos, sparse: bool, lookahead: bool = False) -> tuple:
        """``front`` without a graph, the same ops: (h, FFN input, the predictor's output or None). ``pos`` as
        in ``_mix``; the graph captures this with ``self._pos``, the device tensor."""
        h, x = self._attend_and_norm(l, h, self._mix(l, h, pos))
        pred = self.predictor(l, x) if sparse else None
        if sparse and lookahead and self.la_pred is not None and l < len(self.la_pred):
            pred = (pred, self._run_predictor(self.la_pred[l], x))       # and layer l+1's look-ahead set
        return h, x, pred

    def _front_graphed(self, l: int, h: torch.Tensor, pos: int, sparse: bool, lookahead: bool = False):
        if pos != self._pos_value:
            self._pos.fill_(pos)
            self._pos_value = pos
        g = self._graph.get((l, sparse, lookahead))
        if g is None:
            h_in = h.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):        # warm-up off the capture (writes slot pos; replayed below)
                self.front_eager(l, h_in, self._pos, sparse, lookahead)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = self.front_eager(l, h_in, self._pos, sparse, lookahead)
            g = self._graph[(l, sparse, lookahead)] = (graph, h_in, outs)
        graph, h_in, outs = g
        h_in.copy_(h)
        graph.replay()
        self.predicted = outs[2]
        return outs[0], outs[1]

    def ffn_input(self, l: int, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.spec.d_model,))

    def predictor(self, l: int, x: torch.Tensor):
        """The layer's predicted active set, in the form each path makes it: with the project's kernels the
        tuple (idx, count) of ``predict_active`` (unsorted device index list, no host sync, so it can be
        graphed; PDL on Hopper lets it stream A while the norm finishes), else the torch bool mask
        (x A) B > 0 [tokens, d_ff]. The values mean nothing; the work is a real predictor's."""
        if self.pred is None:
            return None
        return self._run_predictor(self.pred[l], x)

    def _run_predictor(self, ab: tuple, x: torch.Tensor):
        a, b = ab
        if self.fused:
            return predict_active(x, a, b, 0.0, pdl=self._pdl)
        return (x @ a) @ b > 0

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.spec.d_model,)) @ self.emb.T


class TraceEngine:
    """Executes precomputed plans (from a trace) token by token on a SyntheticBody + FlashFFN."""

    def __init__(self, body: SyntheticBody, ffn: FlashFFN, policy: Policy):
        self.body, self.ffn, self.policy = body, ffn, policy
        self.clock = ffn.clock

    def run(self, plans: Iterable[list[LayerPlan]], progress=None) -> list[TokenCost]:
        out = []
        for t, layer_plans in enumerate(plans):
            out.append(self.token(t, layer_plans))
            if progress is not None:
                progress.update(1)
        return out

    def token(self, t: int, layer_plans: list[LayerPlan]) -> TokenCost:
        body, ffn, clock = self.body, self.ffn, self.clock
        tc = ffn.begin_token(t)
        t0 = clock.now(sync=True)
        h = body.embed(t)
        for i, p in enumerate(layer_plans):
            ffn.mark("layer")
            s = clock.start()
            h, x = body.front(p.layer, h, t, self.policy.sparse, bool(self.policy.lookahead))
            clock.stop("compute_s", s, tc)
            ffn.mark("attention")
            clock.sync()                   # a real predictor's mask must reach the host before reads
            ffn.mark("sync")
            h = ffn.run_layer(p, x, residual=h, next_plan=layer_plans[i + 1] if i + 1 < len(layer_plans) else None)
        ffn.flush_insert()                 # the last layer's insert, if deferred: inside the token, in order
        s = clock.start()
        body.head(h)
        clock.stop("compute_s", s, tc)
        tc.latency_s = clock.now(sync=True) - t0
        clock.settle()
        ffn.end_token()
        return tc


# ---- Hugging Face model mode ------------------------------------------------------------------------
class _FFNSite(torch.nn.Module):
    """Stands in for a layer's FFN: OPT's ``fc1`` (its ``activation_fn`` and ``fc2`` are identities; input
    [n, d_model]) or a Llama-style layer's ``mlp`` (input [batch, seq, d_model])."""

    def __init__(self, owner: "HFFlashModel", layer: int):
        super().__init__()
        self.owner, self.layer = [owner], layer     # a list, so the owner is not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.owner[0].ffn_site(self.layer, x.reshape(-1, shape[-1])).view(shape)


MODEL_TYPES = ("opt", "llama")


def cache_kwargs(model, past) -> dict:
    """The KV cache argument of ``model.forward``: ``cache`` from transformers 5.2x on (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return {"cache": past} if "cache" in params else {"past_key_values": past}


def returned_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


class HFFlashModel:
    """A Hugging Face causal LM (``OPTForCausalLM``, or ``LlamaForCausalLM`` with a ReLU gate) with every FFN
    served from ``flash`` through live plans; attention, norms, embeddings and the KV cache are HF's own code
    and weights on ``device``.

    ``model``: either a whole HF model (built in memory: its FFN weights are taken out here) or the stripped
    one of ``real.hf_checkpoint.resident_model`` (any size: only the non-FFN weights were ever loaded), whose
    ``parts`` give per layer the FFN biases and the oracle's projection. ``HFFlashModel.from_checkpoint``
    does the latter from a checkpoint directory.

    The active set of each layer, one of:

    - the oracle (default): the exact ReLU mask of the live FFN input, from a private copy of the up
      projection (gated: the gate) that only the oracle uses, so the output equals the dense model's;
    - ``predictor``: an object with ``predict(layer, x: np.ndarray [n, d]) -> bool [n, d_ff]``
      (``real.predictor.LowRankPredictor``);
    - ``active_sets`` (bool [tokens, layers, d_ff], e.g. a calibrated synthetic trace's): for timing a
      checkpoint whose own activations are not realistic (random init); the FFN then computes those
      neurons, not the model's. ``timing_rank`` > 0 runs a random rank-r predictor per layer on the device
      and moves its mask to the host, so each token pays what a real predictor costs.

    ``calibration_counts``: int [layers, d_ff] activations per neuron on calibration prompts (a recorded
    trace's ``activation_counts()``), for ``policy.warm_start``."""

    def __init__(self, model, flash: FlashDir, policy: Policy, *, device: torch.device | str = "cpu",
                 threads: int = 32, direct: bool = True, predictor=None, kernel: str = "auto",
                 loader: str = "auto", check_cache: bool = False, calibration_counts: np.ndarray | None = None,
                 parts: list[dict] | None = None, active_sets: np.ndarray | None = None, timing_rank: int = 0,
                 seed: int = 0):
        from real.hf_checkpoint import decoder_layers, strip_ffn

        mt = getattr(model.config, "model_type", None)
        if mt not in MODEL_TYPES:
            raise ValueError(f"model: model mode serves {MODEL_TYPES} models, got {mt!r}")
        spec = flash.spec
        self.gated = mt == "llama"
        layers = decoder_layers(model)
        d_ff = getattr(model.config, "ffn_dim", None) or getattr(model.config, "intermediate_size", None)
        if len(layers) != spec.n_layers or model.config.hidden_size != spec.d_model or d_ff != spec.d_ff \
                or (spec.ffn_matrices == 3) != self.gated:
            raise ValueError(f"{flash.root}: flash directory geometry {spec.n_layers}x{spec.d_ff}x{spec.d_model} "
                             f"({spec.ffn_matrices} FFN matrices) does not match the model; convert this model "
                             "(python -m real.convert CHECKPOINT DIR, or real.convert.convert_model)")
        self.policy, self.predictor, self.check_cache = policy, predictor, check_cache
        self.active_sets = None if active_sets is None else np.asarray(active_sets, dtype=bool)
        if self.active_sets is not None and self.active_sets.shape[1:] != (spec.n_layers, spec.d_ff):
            raise ValueError(f"active_sets: shape {self.active_sets.shape} is not [tokens, {spec.n_layers}, "
                             f"{spec.d_ff}]")
        need_oracle = policy.sparse and predictor is None and self.active_sets is None
        if parts is None:                               # a whole model: take its FFN out
            parts = [self._take_parts(layer, need_oracle) for layer in layers]
            strip_ffn(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        wdtype = next(self.model.parameters()).dtype
        if wdtype != DTYPES[spec.dtype]:
            raise ValueError(f"{flash.root}: the flash directory holds {spec.dtype} FFN weights but the model is "
                             f"{wdtype}; load the model in {spec.dtype} or convert with --dtype")
        for l, layer in enumerate(decoder_layers(self.model)):
            if self.gated:
                layer.mlp = _FFNSite(self, l)
            else:
                layer.fc1 = _FFNSite(self, l)           # activation_fn and fc2 are identities (strip_ffn)
        dev = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        self.oracle = [(dev(p.get("oracle_w")), dev(p.get("oracle_b"))) for p in parts] if need_oracle else None
        if need_oracle and any(w is None for w, _ in self.oracle):
            raise ValueError("parts: the oracle needs each layer's oracle_w (resident_model(..., oracle=True))")
        b1 = [p.get("up_bias") for p in parts]
        b2 = [p.get("down_bias") for p in parts]
        self.engine = PolicyEngine(spec, policy, calibration_counts)
        self.ffn = FlashFFN(flash, self.engine.capacity, strategy=policy.mem_strategy, device=self.device,
                            threads=threads, direct=direct, kernel=kernel, loader=loader,
                            up_bias=None if self.gated or any(b is None for b in b1) else b1,
                            down_bias=None if any(b is None for b in b2) else b2)
        self.timing_pred = None
        if self.active_sets is not None and timing_rank > 0 and policy.sparse:
            g = torch.Generator(device=self.device).manual_seed(seed)
            rnd = lambda *s: (torch.randn(*s, generator=g, device=self.device) * 0.02).to(wdtype)  # noqa: E731
            self.timing_pred = [(rnd(spec.d_model, timing_rank), rnd(timing_rank, spec.d_ff))
                                for _ in range(spec.n_layers)]
        self.clock = self.ffn.clock
        self.past = None
        self._cache_arg = next(iter(cache_kwargs(self.model, None)))
        self.plans: list[LayerPlan] = []

    @classmethod
    def from_checkpoint(cls, ckpt, flash: FlashDir, policy: Policy, *, device: torch.device | str = "cpu",
                        predictor=None, active_sets: np.ndarray | None = None, progress: bool = False,
                        **kw) -> "HFFlashModel":
        """From a ``real.hf_checkpoint.Checkpoint``: only its non-FFN weights (and, for the oracle, its up or
        gate projection) are read, onto ``device``; the FFN comes from ``flash``."""
        from real.hf_checkpoint import resident_model
        from real.flash_cache import same_geometry

        cspec = ckpt.spec(flash.spec.dtype)
        if not same_geometry(cspec, flash.spec):
            raise ValueError(f"{flash.root}: was converted from another model than {ckpt.root} ({flash.spec} vs "
                             f"{cspec}); convert this checkpoint")
        oracle = policy.sparse and predictor is None and active_sets is None
        model, parts = resident_model(ckpt, device, flash.spec.dtype, oracle=oracle, progress=progress)
        return cls(model, flash, policy, device=device, predictor=predictor, active_sets=active_sets, parts=parts,
                   **kw)

    def _take_parts(self, layer, oracle: bool) -> dict:
        """The FFN biases and (``oracle``) the oracle's private copy of the deciding projection of an
        in-memory layer."""
        grab = lambda m: None if m is None else m.detach().clone()  # noqa: E731
        if self.gated:
            w = layer.mlp.gate_proj.weight
            return {"up_bias": None, "down_bias": None, "oracle_w": grab(w) if oracle else None, "oracle_b": None}
        b1 = grab(layer.fc1.bias)
        return {"up_bias": b1, "down_bias": grab(layer.fc2.bias),
                "oracle_w": grab(layer.fc1.weight) if oracle else None, "oracle_b": b1}

    def close(self) -> None:
        self.ffn.close()

    def active_set(self, layer: int, x: torch.Tensor) -> np.ndarray:
        if not self.policy.sparse:
            return np.ones(self.engine.spec.d_ff, dtype=bool)   # naive computes everything
        if self.active_sets is not None:
            if self.timing_pred is not None:
                a, b = self.timing_pred[layer]
                ((x @ a) @ b > 0).any(0).cpu()                  # a predictor's work and its mask to the host
            return self.active_sets[self.engine.token % len(self.active_sets), layer]
        if self.predictor is not None:
            pred = np.asarray(self.predictor.predict(layer, x.float().cpu().numpy()), dtype=bool)
            return pred.reshape(-1, self.engine.spec.d_ff).any(0)
        w, b = self.oracle[layer]
        # the same op as the dense model's fc1 (gate_proj), so the sign is the one its ReLU sees
        return (F.linear(x, w, b) > 0).any(0).cpu().numpy()

    def ffn_site(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        active = self.active_set(layer, x)
        self.clock.sync()
        plan = self.engine.plan_layer(layer, active)
        self.plans.append(plan)
        y = self.ffn.run_layer(plan, x)
        if self.check_cache:
            self.ffn.caches[layer].check(self.engine.caches[layer])
        return y

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, TokenCost]:
        """Feed ``input_ids`` [1, n] (n >= 1; a prompt may go at once: its FFN active set is the union);
        returns the logits of the last position and the token's cost."""
        tc = self.ffn.begin_token(self.engine.token)
        self.plans = []
        t0 = self.clock.now(sync=True)
        out = self.model(input_ids=input_ids.to(self.device), use_cache=True, **{self._cache_arg: self.past})
        self.ffn.flush_insert()                       # a deferred insert of the last layer, inside the token
        logits = out.logits[:, -1]
        tc.latency_s = self.clock.now(sync=True) - t0
        self.clock.settle()
        self.ffn.end_token()
        tc.compute_s = tc.latency_s - tc.mem_s - self.ffn.io_wait_s   # HF's own code is not spanned
        self.past = returned_cache(out)
        self.engine.next_token()
        return logits, tc

    @torch.no_grad()
    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor], list[TokenCost]]:
        """Greedy decoding, one token per step (the prompt token by token too)."""
        ids, all_logits, costs = list(prompt), [], []
        for i in range(len(prompt) + new_tokens - 1):
            logits, tc = self.step(torch.tensor([[ids[i]]]))
            all_logits.append(logits[0])
            costs.append(tc)
            if i >= len(prompt) - 1:
                ids.append(int(logits[0].argmax()))
        return ids, all_logits, costs


OPTFlashModel = HFFlashModel    # the name before Llama-style models were served too


def plans_checked(engine: PolicyEngine, ffn: FlashFFN, active: np.ndarray) -> Iterator[list[LayerPlan]]:
    """Plan ``active`` [tokens, layers, d_ff] token by token and, before each next token, assert that
    the FlashFFN's caches equal the policy engine's bookkeeping (for tests and debug runs)."""
    for t in range(active.shape[0]):
        yield engine.plan_token(active[t])
        ffn.flush_insert()
        for l, cache in enumerate(ffn.caches):
            cache.check(engine.caches[l])
