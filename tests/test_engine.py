"""Exactness of the flash-offloaded engine: with the oracle, its logits equal the dense in-memory HF
model's to float32 rounding, and greedy decoding gives the same tokens, for every policy, several
windows and memory budgets; trace mode's FFN equals the dense masked FFN."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from real.engine import FlashFFN, OPTFlashModel, SyntheticBody, TraceEngine, plans_checked  # noqa: E402
from real.kernels import active_list  # noqa: E402
from real.kernels.predictor import misclassified  # noqa: E402
from real.flash_cache import build_opt, flash_dir_for  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.trace import SyntheticTraceConfig, generate_trace  # noqa: E402

SPEC = ModelSpec.preset("opt-tiny")   # 2 layers, d_model 64, d_ff 512, 4 heads, vocab 256, float32
# d_model 512 float32: a neuron's bundle is exactly one 4 KiB record, so the staged records are the rows and
# the loader can queue them on the device before the reads end (gated loads); opt-tiny's 512-byte bundles
# are padded to 4 KiB records, which need unpadding after the reads (never gated)
GATE_SPEC = ModelSpec.from_dict({**SPEC.to_dict(), "name": "opt-tiny-gate", "d_model": 512, "n_heads": 8,
                                 "d_ff": 1024})
EPS = torch.finfo(torch.float32).eps


def tolerance(ref_logits: torch.Tensor) -> float:
    """Only the order of the FFN sums differs (resident rows, then new rows; subsets of neurons):
    each of the n = d_ff + d_model terms of a dot product may round differently, per layer, and the
    logits scale the error by their magnitude. Factor 4 for the final norm and head."""
    n = SPEC.d_ff + SPEC.d_model
    return 4 * SPEC.n_layers * n * EPS * float(ref_logits.abs().max())


def policy(name: str, **kw) -> Policy:
    # opt-tiny's embeddings and attention are half the model: the budget must be higher than the paper's
    # 0.5 to leave room for an FFN cache, and the predictor small (rank 16 < d_model)
    return Policy.from_dict({**Policy.preset(name).to_dict(), "memory_budget": 0.9, "predictor_rank": 16, **kw})


CASES = [
    ("naive", {}),
    ("naive", {"memory_budget": 0.6}),
    ("predictor", {}),
    ("windowing", {"window": 1}),
    ("windowing", {"window": 3, "memory_budget": 0.7}),
    ("windowing_bundling", {}),
    ("windowing_bundling", {"window": 2, "memory_budget": 0.65, "chunk_kib": 4}),
    ("windowing_bundling", {"window": 8, "eviction": "lru", "mem_strategy": "concat"}),
    ("windowing_bundling", {"window": 2, "eviction": "lfu", "memory_budget": 0.7, "read_threads": "python"}),
    # a warm start: the first token also reads neurons it does not compute (the profile's hottest)
    ("windowing_bundling", {"window": 2, "eviction": "frequency", "warm_start": True, "memory_budget": 0.7}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES])
def test_flash_logits_equal_dense(tmp_path_factory, monkeypatch, name, kw):
    kw = dict(kw)
    # the loader's default reader threads are native (pthreads of real/native_read.c) where the C loop
    # builds; a case may ask for Python threads instead
    threads = kw.pop("read_threads", None)
    if threads:
        monkeypatch.setenv("FLASHLAB_READ_THREADS", threads)
    pol = policy(name, **kw)
    cache_dir = tmp_path_factory.getbasetemp() / "flash"
    flash = flash_dir_for(SPEC, pol.bundling, cache_dir)
    ref = build_opt(SPEC, seed=0)
    counts = (np.random.default_rng(5).integers(0, 50, (SPEC.n_layers, SPEC.d_ff)).astype(np.int32)
              if pol.warm_start else None)   # any profile: the output must not depend on what is cached
    m = OPTFlashModel(build_opt(SPEC, seed=0), flash, pol, check_cache=True, calibration_counts=counts)
    try:
        from real.loader import native_drain
        want = threads or ("native" if native_drain() is not None else "python")
        assert m.ffn.loads.loader.pool.threads == want
        assert all(not hasattr(layer.fc1, "weight") for layer in m.model.model.decoder.layers), \
            "the FFN weights must live on flash only"
        prompt = [2, 17, 201, 45, 9]
        ids, logits, costs = m.generate(prompt, new_tokens=10)
    finally:
        m.close()
    with torch.no_grad():
        dense = ref(torch.tensor([ids[:-1]])).logits[0]
    ref_ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ref_ids.append(int(ref(torch.tensor([ref_ids])).logits[0, -1].argmax()))
    assert ids == ref_ids, "greedy decoding differs from the dense model"
    err = (torch.stack(logits) - dense).abs().max().item()
    assert err <= tolerance(dense), f"max |logit diff| {err:.3g} > tolerance {tolerance(dense):.3g}"
    # the run really went through flash and the cache
    assert sum(c.bytes for c in costs) > 0
    if pol.sparse and pol.window > 0:
        assert np.mean([c.new_neurons for c in costs[3:]]) < np.mean([c.new_neurons for c in costs[:1]])


def test_sparse_active_set_is_a_minority(tmp_path):
    """The tiny model is ReLU-sparse like OPT (otherwise the policies would be trivial)."""
    m = OPTFlashModel(build_opt(SPEC), flash_dir_for(SPEC, True, tmp_path), policy("windowing_bundling"))
    try:
        m.generate([5, 6], 3)
        assert np.mean([p.active.size for p in m.plans]) < 0.3 * SPEC.d_ff
    finally:
        m.close()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device,copy_chunks,gate", [("cpu", 3, False), pytest.param("cuda", 1, False, marks=CUDA),
                                                     pytest.param("cuda", 3, False, marks=CUDA),
                                                     pytest.param("cuda", 1, True, marks=CUDA),
                                                     pytest.param("cuda", 3, True, marks=CUDA)])
@pytest.mark.parametrize("loader", ["auto", "simple"])
@pytest.mark.parametrize("name", ["naive", "predictor", "windowing", "windowing_bundling"])
def test_trace_mode_ffn_equals_masked_dense(tmp_path, name, loader, device, copy_chunks, gate):
    """Trace mode: per layer the FFN output equals the dense FFN restricted to the plan's active set,
    with the weights read from flash through the plan; the cache follows the policy engine. On a GPU
    too (float32: the torch path, but the device copies, chunked jobs, gated waits and cache moves are
    the GPU's)."""
    pol = policy(name)
    spec = GATE_SPEC if gate else SPEC
    flash = flash_dir_for(spec, pol.bundling, tmp_path)
    layers = build_opt(spec).model.decoder.layers
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=12, seed=3, sparsity=0.8, reuse=0.5))
    engine = PolicyEngine(spec, pol)
    ffn = FlashFFN(flash, engine.capacity, strategy=pol.mem_strategy, threads=4, loader=loader, device=device,
                   copy_chunks=copy_chunks, gate_reads=gate, up_bias=[l.fc1.bias.detach() for l in layers],
                   down_bias=[l.fc2.bias.detach() for l in layers])
    queued = count_gated_loads(ffn)
    try:
        assert_trace_mode_exact(ffn, engine, trace, layers, device)
    finally:
        ffn.close()
    if gate and loader == "auto" and pol.bundling:
        assert ffn.loads_gated and queued, "gated reads should be on (GPU, native reader threads, 4 KiB bundles)"


@pytest.mark.parametrize("device,gate", [("cpu", False), pytest.param("cuda", True, marks=CUDA)])
def test_trace_mode_warm_start_computes_only_the_active_neurons(tmp_path, device, gate):
    """A warm start's first token reads the profile's hottest neurons too; the FFN must still cover exactly
    the active ones (the others are only stored), and the caches follow the policy engine."""
    pol = policy("windowing_bundling", window=2, eviction="frequency", warm_start=True)
    spec = GATE_SPEC if gate else SPEC
    flash = flash_dir_for(spec, True, tmp_path)
    layers = build_opt(spec).model.decoder.layers
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=6, seed=3, sparsity=0.8, reuse=0.5, rate_skew=1.0,
                                                      calibration_tokens=30))
    engine = PolicyEngine(spec, pol, trace.calibration_counts)
    ffn = FlashFFN(flash, engine.capacity, threads=4, device=device, gate_reads=gate,
                   up_bias=[l.fc1.bias.detach() for l in layers], down_bias=[l.fc2.bias.detach() for l in layers])
    loads = []
    real_run = ffn.run_layer
    ffn.run_layer = lambda p, *a, **k: (loads.append(p.load.size - p.n_new_active), real_run(p, *a, **k))[1]
    try:
        assert_trace_mode_exact(ffn, engine, trace, layers, device)
    finally:
        ffn.close()
    assert loads[0] > 0, "the first token should read neurons it does not compute"


@pytest.mark.parametrize("layers_n", [2, 1])
@pytest.mark.parametrize("device,gate", [("cpu", False), pytest.param("cuda", False, marks=CUDA),
                                         pytest.param("cuda", True, marks=CUDA)])
def test_deferred_cache_inserts_keep_the_ffn_and_the_caches_exact(tmp_path, device, gate, layers_n):
    """defer_insert: each layer's cache insert is queued after the next layer's reads are submitted (on by
    default only on a GPU; forced on the CPU here, where the work is synchronous, so that CI runs the path).
    With one layer the held-back insert is the layer's own, queued before its resident FFN reads the cache.
    Outputs and the caches (checked after every token) stay exact."""
    pol = policy("windowing_bundling", window=2, eviction="lfu")
    spec = GATE_SPEC if gate else SPEC
    spec = ModelSpec.from_dict({**spec.to_dict(), "name": f"{spec.name}-{layers_n}l", "n_layers": layers_n})
    flash = flash_dir_for(spec, True, tmp_path)
    layers = build_opt(spec).model.decoder.layers
    trace = generate_trace(spec, SyntheticTraceConfig(tokens=10, seed=2, sparsity=0.8, reuse=0.5))
    engine = PolicyEngine(spec, pol)
    ffn = FlashFFN(flash, engine.capacity, threads=4, device=device, gate_reads=gate, defer_insert=True,
                   up_bias=[l.fc1.bias.detach() for l in layers], down_bias=[l.fc2.bias.detach() for l in layers])
    held = []
    try:
        assert ffn.defer_insert == (device == "cuda")
        ffn.defer_insert = True
        real_defer = ffn._insert_or_defer
        ffn._insert_or_defer = lambda *a: (real_defer(*a), held.append(ffn._deferred is not None))[0]
        assert_trace_mode_exact(ffn, engine, trace, layers, device)
    finally:
        ffn.close()
    assert held and all(held), "inserts should have been held back"


def count_gated_loads(ffn) -> list:
    """A list that grows by one per load the engine queued on the device before its reads ended."""
    queued = []
    if ffn.loads_gated:
        real_queue = ffn.loads.queue_rows
        ffn.loads.queue_rows = lambda *a: (queued.append(1), real_queue(*a))[1]
    return queued


def assert_trace_mode_exact(ffn, engine, trace, layers, device, pipelined: bool = False):
    """Every layer's output against the dense FFN masked to the plan's active set. ``pipelined``: each layer is
    given the next one's plan, as TraceEngine does (look-ahead plans: its early reads are issued one layer ahead)."""
    spec = engine.spec
    gen = torch.Generator().manual_seed(0)
    for layer_plans in plans_checked(engine, ffn, trace.active):
        ffn.begin_token(layer_plans[0].token)
        for i, p in enumerate(layer_plans):
            x = torch.randn(1, spec.d_model, generator=gen)
            nxt = layer_plans[i + 1] if pipelined and i + 1 < len(layer_plans) else None
            y = ffn.run_layer(p, x.to(device), next_plan=nxt).cpu()
            w1, b1 = layers[p.layer].fc1.weight.detach(), layers[p.layer].fc1.bias.detach()
            w2, b2 = layers[p.layer].fc2.weight.detach(), layers[p.layer].fc2.bias.detach()
            h = torch.relu(x @ w1.T + b1)
            mask = torch.zeros(spec.d_ff)
            mask[torch.from_numpy(p.active)] = 1
            want = (h * mask) @ w2.T + b2
            assert torch.allclose(y, want, rtol=0, atol=8 * spec.d_ff * EPS * float(want.abs().max() + 1)), \
                f"token {p.token} layer {p.layer}"
        ffn.end_token()


@CUDA
@pytest.mark.parametrize("copy_chunks", [1, 3])
def test_gated_reads_completed_late_are_copied_and_computed_again(tmp_path, monkeypatch, copy_chunks):
    """Gated reads: the device copy is queued before the reads end. A read that came back short is
    completed by the host after the reader threads set the flag, so the queued copy may take the bytes
    before the completion: the loader copies again and the engine recomputes the new rows' FFN. Here the
    reader threads read nothing for the first read of every job (its bytes scribbled over beforehand) and
    set the flag; the device consumes the bad bytes (a sync) before the host completes the read: the
    outputs are right only if the copy and the FFN are redone. (The flags stay the reader threads' job,
    so an implicit device sync anywhere on the host cannot hold the device wait.)"""
    import ctypes

    from real.loader import ReadPool
    real_submit, real_wait = ReadPool.submit, ReadPool._wait_c
    full = {}

    def submit_first_read_empty(pool, files, dest, file_idx, dst_off, offset, length, flag=None):
        length = np.array(length, dtype=np.int64)
        if length.size:
            ctypes.memset(np.frombuffer(dest, np.uint8).ctypes.data + int(dst_off[0]), 0xFF, int(length[0]))
            first, length[0] = int(length[0]), 0
        job = real_submit(pool, files, dest, file_idx, dst_off, offset, length, flag=flag)
        if length.size:
            full[id(job)] = first
        return job

    def short_first_read(pool, job):
        real_wait(pool, job)
        torch.cuda.current_stream().synchronize()     # the queued copies and FFN have used the bad bytes
        if id(job) in full:                           # its real length: 0 of it done, the host does the rest
            job.native[3][0] = full.pop(id(job))

    monkeypatch.setattr(ReadPool, "submit", submit_first_read_empty)
    monkeypatch.setattr(ReadPool, "_wait_c", short_first_read)
    pol = policy("windowing_bundling")
    flash = flash_dir_for(GATE_SPEC, True, tmp_path)
    layers = build_opt(GATE_SPEC).model.decoder.layers
    trace = generate_trace(GATE_SPEC, SyntheticTraceConfig(tokens=6, seed=5, sparsity=0.8, reuse=0.5))
    engine = PolicyEngine(GATE_SPEC, pol)
    ffn = FlashFFN(flash, engine.capacity, threads=4, device="cuda", read_threads="native", gate_reads=True,
                   copy_chunks=copy_chunks, up_bias=[l.fc1.bias.detach() for l in layers],
                   down_bias=[l.fc2.bias.detach() for l in layers])
    refetched = []
    real_rows = ffn.loads.rows
    monkeypatch.setattr(ffn.loads, "rows", lambda p: (real_rows(p), refetched.append(p.refetched))[0])
    queued = count_gated_loads(ffn)
    try:
        assert ffn.loads_gated
        assert_trace_mode_exact(ffn, engine, trace, layers, "cuda")
    finally:
        ffn.close()
    assert queued and sum(refetched) == len(queued), "every gated load had a short read: each is copied again"


def test_trace_engine_reports_parts(tmp_path):
    pol = policy("windowing_bundling")
    flash = flash_dir_for(SPEC, True, tmp_path)
    trace = generate_trace(SPEC, SyntheticTraceConfig(tokens=8, seed=1))
    plans = list(PolicyEngine(SPEC, pol).plan_trace(trace))
    body = SyntheticBody(SPEC, torch.device("cpu"), max_tokens=8, predictor_rank=16)
    ffn = FlashFFN(flash, PolicyEngine(SPEC, pol).capacity, threads=2)
    try:
        costs = TraceEngine(body, ffn, pol).run(plans)
    finally:
        ffn.close()
    assert [c.bytes for c in costs] == [sum(p.bytes for p in ps) for ps in plans]
    for c, ps in zip(costs, plans):
        assert c.latency_s > 0 and c.compute_s > 0
        # every part is a measured span: memory management takes time whenever rows move, reads whenever
        # bytes are read, and on the CPU compute and memory management are sequential host spans
        if any(p.n_inserted or p.evict.size or p.rows_copied for p in ps):
            assert c.mem_s > 0
        assert (c.io_s > 0) == (c.bytes > 0)
        assert c.compute_s + c.mem_s <= c.latency_s


@pytest.mark.parametrize("kv_heads", [0, 2], ids=["mha", "gqa"])
def test_fixed_shape_attention_equals_the_sliced_one(kv_heads):
    """The CUDA-graph path attends over every key slot with the later ones masked: same output and
    the same KV cache as attending over the written slots only (checked here on the CPU), with and without
    grouped-query attention (2 key/value heads for 4 query heads)."""
    spec = ModelSpec.from_dict({**SPEC.to_dict(), "n_kv_heads": kv_heads})
    eager = SyntheticBody(spec, torch.device("cpu"), max_tokens=6, predictor_rank=16, seed=3)
    static = SyntheticBody(spec, torch.device("cpu"), max_tokens=6, predictor_rank=16, seed=3)
    g = torch.Generator().manual_seed(0)
    for pos in range(6):
        h = torch.randn(1, spec.d_model, generator=g)
        for l in range(spec.n_layers):
            want = eager.attention(l, h, pos)
            got = static.attention(l, h, torch.tensor([pos]))   # the graph's fixed shapes
            tol = 16 * EPS * float(want.abs().max())
            assert (got - want).abs().max().item() <= tol
    assert torch.equal(static.kv_cache, eager.kv_cache)
    assert eager.kv_cache.shape[2] == spec.kv_heads
    h_e, x_e = eager.front(0, h, 5, True)    # eager on the CPU
    assert torch.allclose(h_e, eager.attention(0, h, 5)) and torch.allclose(x_e, eager.ffn_input(0, h_e))


def _front_both(plain, fused, l, h, pos):
    """One layer's front on each body (copies of the outputs), and the set the kernels' front predicted."""
    h_p, x_p = (t.clone() for t in plain.front(l, h, pos, True))
    h_f, x_f = (t.clone() for t in fused.front(l, h, pos, True))
    return h_p, x_p, h_f, x_f, active_list(*fused.predicted)


def test_body_with_the_kernels_equals_the_torch_body():
    """kernel='auto' swaps addmm + layer_norm for the fused add + LayerNorm and (x A) B > 0 for
    predict_active. On the CPU their torch references stand in for the kernels: this checks the wiring
    (which output is h and which the FFN input, the index list against the mask)."""
    plain = SyntheticBody(SPEC, torch.device("cpu"), max_tokens=4, predictor_rank=16, seed=3, kernel="torch")
    fused = SyntheticBody(SPEC, torch.device("cpu"), max_tokens=4, predictor_rank=16, seed=3)
    assert not fused.fused                     # the CPU keeps plain torch unless told otherwise
    fused.fused = True
    h = torch.randn(1, SPEC.d_model, generator=torch.Generator().manual_seed(0))
    for pos in range(3):
        for l in range(SPEC.n_layers):
            h_p, x_p, h_f, x_f, active = _front_both(plain, fused, l, h, pos)
            # addmm rounds h + o @ wo once, mm then add twice: one float32 rounding of h's size apart
            assert (h_f - h_p).abs().max().item() <= 4 * EPS * float(h_p.abs().max())
            assert (x_f - x_p).abs().max().item() <= 64 * EPS * float(x_p.abs().max())
            mask = plain.predictor(l, x_f).any(0)        # the same float32 ops as the reference's
            assert 0 < active.numel() < SPEC.d_ff
            assert torch.equal(active, torch.nonzero(mask).reshape(-1))
            assert misclassified(x_f, *fused.pred[l], *fused.predicted)[1] == 0
        h = h_f
    with pytest.raises(ValueError, match="kernel"):
        SyntheticBody(SPEC, torch.device("cpu"), max_tokens=4, kernel="triton")


def test_body_falls_back_to_torch_when_its_kernels_fail(monkeypatch):
    """A kernel that cannot run here (old Triton, unsupported GPU) is found at construction: a warning, then
    plain torch, rather than a failure mid-run."""
    import real.engine as engine

    body = SyntheticBody(SPEC, torch.device("cpu"), max_tokens=4, predictor_rank=16)
    body.fused = True
    body._try_kernels()                        # the references run: nothing to fall back from
    assert body.fused

    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(engine, "predict_active", broken)
    with pytest.warns(RuntimeWarning, match="no kernel here"):
        body._try_kernels()
    assert not body.fused and not body._pdl
    h, x = body.front(0, torch.zeros(1, SPEC.d_model), 0, True)
    assert body.predicted.dtype == torch.bool          # the torch mask


@CUDA
def test_body_kernels_on_the_gpu_match_float64():
    """On a GPU (fp16) the body's Triton add + LayerNorm and predictor, graphed with PDL, against the torch
    body (h to one extra fp16 rounding of o @ wo; the FFN input, which normalising scales by |h|/std, to a
    few) and the set the graph predicted against float64 scores of its FFN input: the kernel adds fp16
    products in fp32, so a neuron may land on the other side of the threshold only within
    (d_model + rank) fp32 roundings of |x| |A| |B|."""
    spec = ModelSpec.from_dict({**GATE_SPEC.to_dict(), "name": "opt-tiny-fp16", "dtype": "float16"})
    dev = torch.device("cuda")
    plain = SyntheticBody(spec, dev, max_tokens=4, predictor_rank=32, seed=3, kernel="torch")
    fused = SyntheticBody(spec, dev, max_tokens=4, predictor_rank=32, seed=3)
    assert fused.fused and fused.graphs
    eps16 = torch.finfo(torch.float16).eps
    h = (torch.randn(1, spec.d_model, device=dev, generator=torch.Generator(dev).manual_seed(0)) * 0.5).half()
    for pos in range(3):
        for l in range(spec.n_layers):
            h_p, x_p, h_f, x_f, active = _front_both(plain, fused, l, h, pos)
            assert (h_f.float() - h_p.float()).abs().max().item() <= 2 * eps16 * float(h_p.abs().max())
            assert (x_f.float() - x_p.float()).abs().max().item() <= 4 * eps16 * float(x_p.abs().max())
            off, beyond = misclassified(x_f, *fused.pred[l], *fused.predicted)
            assert 0 < active.numel() < spec.d_ff
            assert beyond == 0, f"{off} neurons off, {beyond} beyond rounding"
        h = h_f.clone()


def test_clock_reuses_each_gpu_event_once(monkeypatch):
    """GPU spans are CUDA events from a pool; a ``lap`` event ends one span and starts the next, so it
    must go back to the pool once (twice, it would later time two spans at once: wrong parts)."""
    from real.engine import Clock
    from sim.simulator import TokenCost

    now = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = now[0]

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = Clock(torch.device("cpu"))
    clock.cuda = True
    for _ in range(3):
        tc = TokenCost(token=0)
        s = clock.start()
        now[0] += 1.0
        s = clock.lap("io_s", s, tc)
        now[0] += 2.0
        s = clock.lap("mem_s", s, tc)
        now[0] += 4.0
        clock.stop("compute_s", s, tc)
        clock.settle()
        assert (tc.io_s, tc.mem_s, tc.compute_s) == (1.0, 2.0, 4.0)
        assert len(clock._free) == len({id(e) for e in clock._free}) == 4
