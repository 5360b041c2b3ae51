"""The flash-offloaded inference engine: every FFN layer is served from a converted flash directory
through the policy engine's plans; attention, embeddings and norms stay in memory.

One layer of one token, the same steps and overlap the simulator times (sim/simulator.py):

    attention -> predictor (the active set must reach the host: a sync)
              -> submit the plan's reads (loader threads, O_DIRECT)
              -> FFN over the active neurons already resident        } overlapped
              -> [GPU] evictions and row moves (queued before the reads) }
              -> wait for the reads, copy them to the device           }
              -> [CPU] evictions and row moves; then inserts
              -> FFN over the new neurons (from the staging rows) -> residual add

Two drivers share ``FlashFFN``:

- ``OPTFlashModel`` (mode ``model``): a Hugging Face ``OPTForCausalLM`` whose FFN sites are replaced,
  so its attention/norm/embedding code is HF's own. The active set is the oracle's (the exact ReLU
  mask, from an in-memory copy of the up projection that only the oracle uses) or a trained
  ``real.predictor.LowRankPredictor``; plans are made layer by layer with ``PolicyEngine.plan_layer``.
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

import time
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from real.flash_dir import FlashDir
from real.flash_reader import aligned_buffer, open_reader
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
             impl: str = "auto") -> torch.Tensor:
    """sum over rows r (all, or ``idx``) of act(x . up[r] + bias[r]) down[r]; gated: act(x . gate[r]) (x . up[r]).

    The kernels' fused ``sparse_ffn`` (Triton on CUDA for fp16/bf16); its plain-torch reference
    elsewhere, or everywhere with ``impl="torch"``."""
    if impl == "torch" or not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return sparse_ffn_reference(x, up, down, idx, gate=gate, bias=bias, activation=activation)
    return sparse_ffn(x, up, down, idx, gate=gate, bias=bias, activation=activation, impl="auto")


class Clock:
    """Wall time, and spans of work: CUDA events on a GPU (no host synchronisation, so the host keeps
    queueing work), ``perf_counter`` on the CPU. ``settle`` adds the GPU spans after a sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._open: list = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, part: str, start, tc: TokenCost) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._open.append((tc, part, start, e))
        else:
            setattr(tc, part, getattr(tc, part) + time.perf_counter() - start)

    def settle(self) -> None:
        """Call after a device sync: credit every recorded GPU span to its token's part."""
        for tc, part, a, b in self._open:
            setattr(tc, part, getattr(tc, part) + a.elapsed_time(b) / 1e3)
        self._open.clear()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self, sync: bool = False) -> float:
        if sync:
            self.sync()
        return time.perf_counter()


# ---- reads: the storage issue's loader, or the engine's own small reader -------------------------
class SimpleLoads:
    """Plan reads through ``real.flash_reader.FlashReader`` into one staging area; rows on the device."""

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


class LoaderLoads:
    """The storage issue's ``real.loader.FlashLoader`` behind the same three calls."""

    def __init__(self, flash: FlashDir, device: torch.device, threads: int, direct: bool):
        from real.loader import FlashLoader
        self.loader = FlashLoader(flash, device=str(device), depth=threads, direct=direct)
        self.direct = self.loader.direct

    def submit(self, plan: LayerPlan):
        return self.loader.submit(plan.layer, plan.reads, plan.load)

    def wait_reads(self, pending) -> tuple[float, float]:
        self.loader.pool.wait(pending.job)
        return pending.job.t_submit, pending.job.t_done

    def rows(self, pending) -> torch.Tensor:
        return self.loader.wait(pending)

    def close(self) -> None:
        self.loader.close()


LOADERS = ("auto", "loader", "simple")


def open_loads(flash: FlashDir, device: torch.device, threads: int, direct: bool, loader: str = "auto"):
    """``loader``: "loader" = real.loader.FlashLoader, "simple" = real.flash_reader, "auto" = the
    former where it imports, else the latter."""
    if loader not in LOADERS:
        raise ValueError(f"backend.loader: unknown {loader!r}; use one of {LOADERS}")
    if loader in ("auto", "loader"):
        try:
            return LoaderLoads(flash, device, threads, direct)
        except ImportError:
            if loader == "loader":
                raise
    return SimpleLoads(flash, device, threads, direct)


class FlashFFN:
    """All FFN layers of one model, served from a flash directory through plans."""

    def __init__(self, flash: FlashDir, capacity: int, *, strategy: str = "preallocated",
                 device: torch.device | str = "cpu", threads: int = 32, direct: bool = True,
                 up_bias: list[torch.Tensor] | None = None, down_bias: list[torch.Tensor] | None = None,
                 kernel: str = "auto", loader: str = "auto"):
        spec, layout = flash.spec, flash.layout
        self.flash, self.spec, self.layout = flash, spec, layout
        self.device = torch.device(device)
        self.clock = Clock(self.device)
        self.dtype = DTYPES[spec.dtype]
        self.d, self.n_mat = spec.d_model, spec.ffn_matrices
        self.width = self.n_mat * self.d
        self.activation, self.kernel = spec.activation, kernel
        self.caches = [NeuronCache(spec.d_ff, capacity, self.width, self.dtype, self.device, strategy)
                       for _ in range(spec.n_layers)]
        self.loads = open_loads(flash, self.device, threads, direct, loader)
        gated = self.n_mat == 3
        mk = lambda n: torch.zeros(n, dtype=self.dtype, device=self.device)  # noqa: E731
        self.b1 = None if gated else [(b.to(self.device, self.dtype) if up_bias is not None else mk(spec.d_ff))
                                      for b in (up_bias or [None] * spec.n_layers)]
        self.b2 = [b.to(self.device, self.dtype) for b in down_bias] if down_bias is not None else None
        self.stats = TokenCost(token=-1)
        self.io_wait_s = 0.0

    def close(self) -> None:
        self.loads.close()

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

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
             idx: torch.Tensor | None) -> torch.Tensor:
        gate, up, down = self._views(rows)
        return ffn_rows(x, up, down, gate=gate, idx=idx, bias=bias, activation=self.activation, impl=self.kernel)

    # ---- one layer -------------------------------------------------------------------------
    def run_layer(self, plan: LayerPlan, x: torch.Tensor) -> torch.Tensor:
        """Execute ``plan`` for FFN input ``x`` [n, d_model]; returns the FFN output [n, d_model].

        CPU: submit the reads, compute over the resident neurons meanwhile, then memory management.
        GPU: queue the resident FFN and the evictions/moves on the device first (they need no new
        rows), then submit the reads, so the host only waits (and helps read) while they are in
        flight and does not compete with the reader threads for the interpreter."""
        l, st, clock, dev = plan.layer, self.stats, self.clock, self.device
        cache, load, gpu = self.caches[l], plan.load, self.clock.cuda
        pending = self.loads.submit(plan) if load.size and not gpu else None
        res = np.setdiff1d(plan.active, load, assume_unique=True) if load.size else plan.active
        y = None
        if res.size:
            s = clock.start()
            rows = cache.rows_for(res)
            if rows.size == cache.n_rows and rows[0] == 0 and rows[-1] == rows.size - 1 and \
                    np.array_equal(rows, np.arange(rows.size)):
                y = self._ffn(x, cache.view(), cache.bias[: cache.n_rows] if self.b1 is not None else None, None)
            else:
                idx = torch.from_numpy(rows).to(dev)
                y = self._ffn(x, cache.data, cache.bias if self.b1 is not None else None, idx)
            clock.stop("compute_s", s, st)
        if gpu:
            s = clock.start()
            cache.evict(plan)
            clock.stop("mem_s", s, st)
        load_idx = torch.from_numpy(load).to(dev) if load.size and self.b1 is not None else None
        if load.size and gpu:
            pending = self.loads.submit(plan)
        new_rows = new_bias = None
        if pending is not None:
            t_wait = time.perf_counter()
            t_submit, t_done = self.loads.wait_reads(pending)
            self.io_wait_s += time.perf_counter() - t_wait
            st.io_s += t_done - t_submit
            s = clock.start()
            new_rows = self.loads.rows(pending)              # to the device
            clock.stop("io_s", s, st)
            if load_idx is not None:
                new_bias = self.b1[l].index_select(0, load_idx)
        s = clock.start()
        if not gpu:
            cache.evict(plan)
        cache.insert(plan, new_rows, new_bias)
        clock.stop("mem_s", s, st)
        if new_rows is not None:
            s = clock.start()
            y_new = self._ffn(x, new_rows, new_bias, None)
            y = y_new if y is None else y + y_new
            clock.stop("compute_s", s, st)
        if y is None:
            y = torch.zeros_like(x)
        if self.b2 is not None:
            y = y + self.b2[l]
        st.bytes += plan.bytes
        st.reads += plan.n_reads
        st.new_neurons += int(load.size)
        st.resident_neurons += plan.resident
        return y


# ---- trace-driven mode ----------------------------------------------------------------------------
class SyntheticBody:
    """Everything but the FFN for a geometry: embeddings, per-layer pre-norm attention with a KV cache,
    the FFN pre-norm, the low-rank predictor and the LM head, with random weights. Real matmuls of
    the real sizes, so the per-token compute is a checkpoint's; the values mean nothing."""

    def __init__(self, spec, device: torch.device, max_tokens: int, predictor_rank: int = 0, seed: int = 0):
        self.spec, self.device = spec, device
        dt = DTYPES[spec.dtype]
        g = torch.Generator(device=device).manual_seed(seed)
        d, kv = spec.d_model, spec.kv_heads * spec.head_dim
        rnd = lambda *s: (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * 0.02).to(dt)  # noqa
        self.emb = rnd(spec.vocab, d)
        self.wqkv = [rnd(d, d + 2 * kv) for _ in range(spec.n_layers)]
        self.wo = [rnd(d, d) for _ in range(spec.n_layers)]
        self.k = torch.zeros(spec.n_layers, spec.kv_heads, max_tokens, spec.head_dim, dtype=dt, device=device)
        self.v = torch.zeros_like(self.k)
        self.pred = [(rnd(d, predictor_rank), rnd(predictor_rank, spec.d_ff)) for _ in range(spec.n_layers)] \
            if predictor_rank else None
        self.kv = kv

    @property
    def nbytes(self) -> int:
        ts = [self.emb, *self.wqkv, *self.wo] + ([t for ab in self.pred for t in ab] if self.pred else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def embed(self, token: int) -> torch.Tensor:
        return self.emb[token % self.spec.vocab].unsqueeze(0)

    def attention(self, l: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        s, d, kv = self.spec, self.spec.d_model, self.kv
        a = F.layer_norm(h, (d,))
        qkv = a @ self.wqkv[l]
        q = qkv[:, :d].view(s.n_heads, 1, s.head_dim)
        self.k[l, :, pos] = qkv[0, d:d + kv].view(s.kv_heads, s.head_dim)
        self.v[l, :, pos] = qkv[0, d + kv:].view(s.kv_heads, s.head_dim)
        k, v = self.k[l, :, : pos + 1], self.v[l, :, : pos + 1]
        if s.kv_heads != s.n_heads:
            rep = s.n_heads // s.kv_heads
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        o = F.scaled_dot_product_attention(q, k, v).reshape(1, d)
        return h + o @ self.wo[l]

    def ffn_input(self, l: int, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.spec.d_model,))

    def predictor(self, l: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.pred is None:
            return None
        a, b = self.pred[l]
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
        for p in layer_plans:
            s = clock.start()
            h = body.attention(p.layer, h, t)
            x = body.ffn_input(p.layer, h)
            if self.policy.sparse:
                body.predictor(p.layer, x)
            clock.stop("compute_s", s, tc)
            clock.sync()                   # a real predictor's mask must reach the host before reads
            h = h + ffn.run_layer(p, x)
        s = clock.start()
        body.head(h)
        clock.stop("compute_s", s, tc)
        tc.latency_s = clock.now(sync=True) - t0
        clock.settle()
        return tc


# ---- Hugging Face model mode ------------------------------------------------------------------------
class _FFNSite(torch.nn.Module):
    """Stands in for an OPT layer's ``fc1``; its ``activation_fn`` and ``fc2`` become identities."""

    def __init__(self, owner: "OPTFlashModel", layer: int):
        super().__init__()
        self.owner, self.layer = [owner], layer     # a list, so the owner is not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner[0].ffn_site(self.layer, x)


class OPTFlashModel:
    """An ``OPTForCausalLM`` with every FFN served from ``flash`` through live plans.

    ``predictor``: None for the oracle (exact ReLU mask), or an object with
    ``predict(layer, x: np.ndarray [n, d]) -> bool [n, d_ff]`` (``real.predictor.LowRankPredictor``)."""

    def __init__(self, model, flash: FlashDir, policy: Policy, *, device: torch.device | str = "cpu",
                 threads: int = 32, direct: bool = True, predictor=None, kernel: str = "auto",
                 loader: str = "auto", check_cache: bool = False):
        if getattr(model.config, "model_type", None) != "opt":
            raise ValueError(f"model: OPTFlashModel serves OPT models, got {model.config.model_type!r}")
        spec = flash.spec
        layers = model.model.decoder.layers
        if len(layers) != spec.n_layers or layers[0].fc1.weight.shape != (spec.d_ff, spec.d_model):
            raise ValueError(f"{flash.root}: flash directory geometry {spec.n_layers}x{spec.d_ff}x{spec.d_model} "
                             "does not match the model; convert this model (real.convert.convert_model)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.policy, self.predictor, self.check_cache = policy, predictor, check_cache
        self.engine = PolicyEngine(spec, policy)
        self.oracle = []
        b1, b2 = [], []
        for l, layer in enumerate(layers):
            w1, bias1 = layer.fc1.weight.detach(), layer.fc1.bias.detach()
            self.oracle.append((w1.clone(), bias1.clone()))  # the oracle's private copy; the FFN never uses it
            b1.append(bias1.clone())
            b2.append(layer.fc2.bias.detach().clone())
            layer.fc1 = _FFNSite(self, l)
            layer.activation_fn = torch.nn.Identity()
            layer.fc2 = torch.nn.Identity()                   # FFN weights now live on flash only
        self.ffn = FlashFFN(flash, self.engine.capacity, strategy=policy.mem_strategy, device=self.device,
                            threads=threads, direct=direct, up_bias=b1, down_bias=b2, kernel=kernel, loader=loader)
        self.clock = self.ffn.clock
        self.past = None
        self.plans: list[LayerPlan] = []

    def close(self) -> None:
        self.ffn.close()

    def active_set(self, layer: int, x: torch.Tensor) -> np.ndarray:
        if not self.policy.sparse:
            return np.ones(self.engine.spec.d_ff, dtype=bool)   # naive computes everything
        if self.predictor is not None:
            pred = np.asarray(self.predictor.predict(layer, x.float().cpu().numpy()), dtype=bool)
            return pred.reshape(-1, self.engine.spec.d_ff).any(0)
        w1, b1 = self.oracle[layer]
        return ((x @ w1.T + b1) > 0).any(0).cpu().numpy()

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
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=self.past, use_cache=True)
        logits = out.logits[:, -1]
        tc.latency_s = self.clock.now(sync=True) - t0
        self.clock.settle()
        tc.compute_s = tc.latency_s - tc.mem_s - self.ffn.io_wait_s   # HF's own code is not spanned
        self.past = out.past_key_values
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


def plans_checked(engine: PolicyEngine, ffn: FlashFFN, active: np.ndarray) -> Iterator[list[LayerPlan]]:
    """Plan ``active`` [tokens, layers, d_ff] token by token and, before each next token, assert that
    the FlashFFN's caches equal the policy engine's bookkeeping (for tests and debug runs)."""
    for t in range(active.shape[0]):
        yield engine.plan_token(active[t])
        for l, cache in enumerate(ffn.caches):
            cache.check(engine.caches[l])
