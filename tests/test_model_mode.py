"""Model mode at any size: a checkpoint in the Hugging Face layout (built at random from a preset, sharded), converted
by real.convert, run with only its non-FFN weights loaded and every FFN from flash; with the oracle the logits equal
the dense transformers model's within the dtype's tolerance over 32 generated tokens and greedy tokens are
identical (OPT and a ReLU Llama on the CPU; a full-size OPT on a GPU when FLASHLAB_FULLSIZE_MODEL is set).

Full size, on the GPU machine (see docs/engine.md):
    FLASHLAB_FULLSIZE_MODEL=opt-6.7b FLASHLAB_FULLSIZE_DIR=/root/fullsize python -m pytest -s tests/test_model_mode.py -k fullsize
"""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from real.engine import HFFlashModel, cache_kwargs, returned_cache  # noqa: E402
from real.flash_dir import FlashDir  # noqa: E402
from real.hf_checkpoint import (INDEX, Checkpoint, build_random_checkpoint, converted_flash,  # noqa: E402
                                ffn_names)
from sim.errors import ConfigError  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.policy import Policy  # noqa: E402

OPT = ModelSpec.preset("opt-small")             # 4 layers, d_model 128, d_ff 1024, vocab 1024, float32
LLAMA = ModelSpec.from_dict({**ModelSpec.preset("llama-2-7b").to_dict(), "name": "llama-tiny", "n_layers": 2,
                             "d_model": 64, "d_ff": 256, "n_heads": 4, "vocab": 256, "dtype": "float32"})
NEW_TOKENS = 32


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On a 2-core machine torch's threads and the reader threads fight over the cores (8x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def opt_ckpt(tmp_path_factory):
    # shards of ~2 MB: the sharded layout with its index, as a 7B download has
    return build_random_checkpoint(OPT, tmp_path_factory.mktemp("ckpt") / "opt-small", shard_bytes=2 << 20,
                                   progress=False)


def tolerance(spec: ModelSpec, ref_logits: torch.Tensor) -> float:
    """Both sides accumulate every dot product in fp32 and differ in what they round to the dtype: the dense FFN
    rounds fc1's output and fc2's, the flash FFN the resident and the new neurons' partial sums, then their
    sum (and the order of the fp32 sums differs). That is a few roundings of one layer's FFN output, carried
    through the rest of the network and adding up over the layers; the logits scale it by their magnitude:
    4 * n_layers * eps(dtype) * max|logit|. float32 (where the fp32 sums' order dominates): the same with
    eps32 * (d_ff + d_model), tests/test_engine.py's bound."""
    eps = torch.finfo(getattr(torch, spec.dtype)).eps
    if spec.dtype == "float32":
        eps *= spec.d_ff + spec.d_model
    return 4 * spec.n_layers * eps * float(ref_logits.abs().max())


def policy(name="windowing_bundling", **kw) -> Policy:
    return Policy.from_dict({**Policy.preset(name).to_dict(), "memory_budget": 0.7, "predictor_rank": 16, **kw})


@torch.no_grad()
def dense_greedy(model, prompt: list[int], new_tokens: int, device="cpu"):
    """The dense model decoding greedily as the flash model does: the prompt in one step, then one token a step
    with the KV cache (so attention runs the same shapes on both sides). Returns (ids, logits per step)."""
    ids, logits, past = list(prompt), [], None
    step = torch.tensor([prompt], device=device)
    for _ in range(new_tokens):
        out = model(input_ids=step, use_cache=True, **cache_kwargs(model, past))
        past = returned_cache(out)
        logits.append(out.logits[0, -1].float().cpu())
        ids.append(int(out.logits[0, -1].argmax()))
        step = torch.tensor([[ids[-1]]], device=device)
    return ids, torch.stack(logits)


@torch.no_grad()
def flash_greedy(m: HFFlashModel, prompt: list[int], new_tokens: int):
    ids, logits, costs = list(prompt), [], []
    step = torch.tensor([prompt])
    for _ in range(new_tokens):
        lg, tc = m.step(step)
        costs.append(tc)
        logits.append(lg[0].float().cpu())
        ids.append(int(lg[0].argmax()))
        step = torch.tensor([[ids[-1]]])
    return ids, torch.stack(logits), costs


def top_gap(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


# ---- the checkpoint layout ------------------------------------------------------------------------------
def test_checkpoint_is_hf_layout_and_loads(opt_ckpt):
    from transformers import AutoModelForCausalLM

    files = sorted(p.name for p in opt_ckpt.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert INDEX in files and "config.json" in files
    index = json.loads((opt_ckpt / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(i.shape)) * 4 for i in Checkpoint.open(opt_ckpt).tensors.values())
    cfg = json.loads((opt_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["ffn_dim"] == OPT.d_ff and cfg["num_hidden_layers"] == OPT.n_layers
    model, info = AutoModelForCausalLM.from_pretrained(opt_ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ck = Checkpoint.open(opt_ckpt)
    w = ck.tensor("model.decoder.layers.1.fc1.weight")
    assert torch.equal(model.model.decoder.layers[1].fc1.weight, w)
    assert abs(float(w.std()) - 0.02) < 0.002 and float(ck.tensor("model.decoder.layers.1.fc1.bias").abs().max()) == 0
    # a second build of the same config is kept, not redone
    mtime = (opt_ckpt / shards[0]).stat().st_mtime_ns
    build_random_checkpoint(OPT, opt_ckpt, shard_bytes=2 << 20, progress=False)
    assert (opt_ckpt / shards[0]).stat().st_mtime_ns == mtime


def test_convert_cli_reads_shards(opt_ckpt, tmp_path):
    from real.convert import main as convert_main
    from safetensors import safe_open

    assert convert_main([str(opt_ckpt), str(tmp_path / "flash"), "--layout", "bundled", "--no-progress"]) == 0
    d = FlashDir.open(tmp_path / "flash", verify=True)
    assert d.spec.n_layers == OPT.n_layers and d.layout.bundled
    with safe_open(str(d.resident_path), framework="pt") as f:
        names = set(f.keys())
    assert not any(n.endswith(("fc1.weight", "fc2.weight")) for n in names)   # the FFN lives on flash only
    assert "model.decoder.layers.0.fc1.bias" in names and "lm_head.weight" not in names   # tied: not stored twice
    rec = np.fromfile(d.ffn_paths[2], dtype=np.uint8, count=d.layout.record_bytes, offset=5 * d.layout.record_bytes)
    row = rec[: 2 * OPT.d_model * 4].view(np.float32)
    ck = Checkpoint.open(opt_ckpt)
    assert np.array_equal(row[: OPT.d_model], ck.tensor("model.decoder.layers.2.fc1.weight")[5].numpy())
    assert np.array_equal(row[OPT.d_model:], ck.tensor("model.decoder.layers.2.fc2.weight")[:, 5].numpy())


# ---- exactness on the CPU -----------------------------------------------------------------------------
def test_resident_model_never_reads_the_ffn(opt_ckpt, tmp_path, monkeypatch):
    """Only the non-FFN tensors (and, for the oracle, the up projection) are read from the checkpoint."""
    ck = Checkpoint.open(opt_ckpt)
    flash = converted_flash(ck, tmp_path, progress=False)
    read = []
    orig = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, n: (read.append(n), orig(self, n))[1])
    m = HFFlashModel.from_checkpoint(ck, flash, policy())
    try:
        downs = {ffn_names("opt", l)["down"] for l in range(OPT.n_layers)}
        ups = {ffn_names("opt", l)["up"] for l in range(OPT.n_layers)}
        assert not downs & set(read) and ups <= set(read)          # up: the oracle's private copy
        assert not any(hasattr(layer.fc1, "weight") or hasattr(layer.fc2, "weight")
                       for layer in m.model.model.decoder.layers)
    finally:
        m.close()
    read.clear()
    m = HFFlashModel.from_checkpoint(ck, flash, policy(), active_sets=np.ones((1, OPT.n_layers, OPT.d_ff), bool))
    m.close()
    assert not (downs | ups) & set(read)                           # no oracle: no FFN weight at all


@pytest.mark.parametrize("name,kw", [("windowing_bundling", {}), ("naive", {"memory_budget": 0.6}),
                                     ("windowing", {"window": 2, "eviction": "lru"})])
def test_checkpoint_logits_equal_dense(opt_ckpt, tmp_path, name, kw):
    from transformers import AutoModelForCausalLM

    pol = policy(name, **kw)
    ck = Checkpoint.open(opt_ckpt)
    flash = converted_flash(ck, tmp_path, bundled=pol.bundling, progress=False)
    prompt = [5, 17, 300, 2, 44]
    m = HFFlashModel.from_checkpoint(ck, flash, pol, check_cache=True)
    try:
        ids, logits, costs = flash_greedy(m, prompt, NEW_TOKENS)
    finally:
        m.close()
    ref = AutoModelForCausalLM.from_pretrained(opt_ckpt).eval()
    ref_ids, ref_logits = dense_greedy(ref, prompt, NEW_TOKENS)
    assert ids == ref_ids, "greedy decoding differs from the dense model"
    err = float((logits - ref_logits).abs().max())
    assert err <= tolerance(OPT, ref_logits), f"max |logit diff| {err:.3g} > {tolerance(OPT, ref_logits):.3g}"
    assert sum(c.bytes for c in costs) > 0


def test_float16_checkpoint_within_fp16_tolerance(tmp_path):
    """The dtype the GPU test runs, on the CPU: the fp16 bound 4 * n_layers * eps16 * max|logit| holds."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_dict({**OPT.to_dict(), "dtype": "float16"})
    root = build_random_checkpoint(spec, tmp_path / "opt-small-fp16", progress=False)
    ck = Checkpoint.open(root)
    assert ck.ffn_dtype() == "float16"
    m = HFFlashModel.from_checkpoint(ck, converted_flash(ck, tmp_path / "c", progress=False), policy())
    prompt = [7, 8, 9]
    try:
        ids, logits, _ = flash_greedy(m, prompt, NEW_TOKENS)
    finally:
        m.close()
    ref = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float16).eval()
    ref_ids, ref_logits = dense_greedy(ref, prompt, NEW_TOKENS)
    err = float((logits - ref_logits).abs().max())
    print(f"fp16 opt-small: max |logit diff| {err:.3g}, tolerance {tolerance(spec, ref_logits):.3g}")
    assert ids == ref_ids, f"greedy differs (smallest top-2 gap {top_gap(ref_logits):.3g}, max diff {err:.3g})"
    assert err <= tolerance(spec, ref_logits), f"max |logit diff| {err:.3g} > {tolerance(spec, ref_logits):.3g}"


def test_relu_llama_checkpoint_logits_equal_dense(tmp_path):
    """A Llama-style gated FFN with a ReLU gate (3 matrices bundled per neuron, no biases, rotary positions)."""
    from transformers import AutoModelForCausalLM

    root = build_random_checkpoint(LLAMA, tmp_path / "llama", progress=False)
    ck = Checkpoint.open(root)
    flash = converted_flash(ck, tmp_path / "c", progress=False)
    assert flash.spec.ffn_matrices == 3
    prompt = [3, 1, 4, 1, 5]
    m = HFFlashModel.from_checkpoint(ck, flash, policy(memory_budget=0.8), check_cache=True)
    try:
        ids, logits, costs = flash_greedy(m, prompt, NEW_TOKENS)
        assert np.mean([p.active.size for p in m.plans]) < 0.75 * LLAMA.d_ff      # the gate's zeros are skipped
    finally:
        m.close()
    ref = AutoModelForCausalLM.from_pretrained(root).eval()
    ref_ids, ref_logits = dense_greedy(ref, prompt, NEW_TOKENS)
    assert ids == ref_ids
    err = float((logits - ref_logits).abs().max())
    assert err <= tolerance(LLAMA, ref_logits), f"max |logit diff| {err:.3g}"


def test_model_mode_refuses_what_it_cannot_run(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"model_type: 'gpt2'.*Fix: use a checkpoint of one of: opt"):
        Checkpoint.open(tmp_path / "gpt2")
    (tmp_path / "silu").mkdir()
    (tmp_path / "silu" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "silu"}))
    with pytest.raises(ConfigError, match=r"hidden_act: is 'silu'.*ReLU-fied"):
        Checkpoint.open(tmp_path / "silu")


def test_backend_model_mode_runs_a_checkpoint(opt_ckpt, tmp_path):
    """backend=real backend.mode=model backend.checkpoint=DIR: the checkpoint, not a preset built at random."""
    from real.backend import RealOptions, run_model
    from sim.trace import SyntheticTraceConfig, generate_trace

    setup = SimpleNamespace(spec=OPT, policy=policy(), seed=0, tokens=4, progress=False)
    opts = RealOptions.from_dict({"mode": "model", "checkpoint": str(opt_ckpt), "cache_dir": str(tmp_path)})
    costs = run_model(setup, opts)
    assert len(costs) == 4 and all(c.bytes >= 0 for c in costs) and costs[0].bytes > 0
    trace = generate_trace(OPT, SyntheticTraceConfig(tokens=4, seed=1, sparsity=0.97))
    costs = run_model(setup, RealOptions.from_dict({**opts.__dict__, "active": "trace"}), trace)
    assert costs[0].new_neurons == int(trace.active[0].sum())        # the trace's sets, not the model's
    other = SimpleNamespace(**{**setup.__dict__, "spec": ModelSpec.preset("opt-tiny")})
    with pytest.raises(ConfigError, match=r"backend.checkpoint.*Fix: choose the model preset"):
        run_model(other, opts)


def test_bench_peers_smoke(tmp_path):
    """benchmarks/bench_peers.py at opt-small on the CPU, in one process: every system gives a record with the
    same keys (peers that are not importable say why), Flashlab's records measured."""
    import importlib
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_peers")
    assert bench.main(["--model", "opt-small", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
                       "--tokens", "2", "--inprocess", "--no-progress", "--no-drop-caches"]) == 0
    recs = json.loads((tmp_path / "out" / "results" / "peers.json").read_text())
    assert [r["system"] for r in recs] == list(bench.SYSTEMS)
    assert all(set(bench.KEYS) <= set(r) and set(r) == set(recs[0]) for r in recs)
    by = {r["system"]: r for r in recs}
    for s in ("flashlab-naive", "flashlab-best"):
        assert by[s]["latency_ms"] > 0 and by[s]["bytes_per_token"] > 0 and by[s]["tokens"] == 2
    assert by["flashlab-best"]["bytes_per_token"] < by["flashlab-naive"]["bytes_per_token"]
    assert "synthetic trace" in by["flashlab-best"]["notes"]
    for s in ("flexgen", "deepspeed", "accelerate"):
        assert by[s]["latency_ms"] is not None or by[s]["notes"].startswith("not run")
    assert (tmp_path / "out" / "results" / "peers.txt").read_text().count("flashlab-best") >= 2


# ---- full size, on a GPU ----------------------------------------------------------------------------------
FULL = os.environ.get("FLASHLAB_FULLSIZE_MODEL")
# the GPU; FLASHLAB_FULLSIZE_DEVICE=cpu runs the same test body on the CPU (a dry run at a small preset)
FULL_DEVICE = os.environ.get("FLASHLAB_FULLSIZE_DEVICE") or ("cuda" if torch.cuda.is_available() else None)


@pytest.mark.skipif(not FULL_DEVICE or not FULL,
                    reason="needs a GPU and FLASHLAB_FULLSIZE_MODEL (e.g. opt-6.7b) + FLASHLAB_FULLSIZE_DIR (a disk "
                           "with ~30 GB free)")
def test_fullsize_exactness_gpu():
    """A random-init checkpoint of the preset (fp16, 5 GiB shards) built on the given disk, converted, then 32 greedy
    tokens with the oracle at memory budget 0.5, against the dense model in GPU memory. A random-init OPT fires
    ~half its ReLU neurons, so the oracle's plans read ~half the FFN per token: slow, and exact."""
    from transformers import AutoModelForCausalLM

    root = Path(os.environ.get("FLASHLAB_FULLSIZE_DIR", "/tmp/flashlab-fullsize"))
    spec = ModelSpec.from_dict({**ModelSpec.preset(FULL).to_dict(), "dtype": "float16"})
    t0 = time.perf_counter()
    ckpt_dir = build_random_checkpoint(spec, root / f"ckpt-{spec.name}-float16")
    t_build = time.perf_counter() - t0
    ck = Checkpoint.open(ckpt_dir)
    t0 = time.perf_counter()
    flash = converted_flash(ck, root / "flash", bundled=True)
    t_conv = time.perf_counter() - t0
    pol = Policy.from_dict({**Policy.preset("windowing_bundling").to_dict(), "memory_budget": 0.5})
    prompt = [int(t) for t in np.random.default_rng(0).integers(4, spec.vocab, 8)]
    cuda = FULL_DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    m = HFFlashModel.from_checkpoint(ck, flash, pol, device=FULL_DEVICE, progress=True)
    try:
        t0 = time.perf_counter()
        ids, logits, costs = flash_greedy(m, prompt, NEW_TOKENS)
        t_flash = time.perf_counter() - t0
        capacity = m.engine.capacity
    finally:
        m.close()
    peak_flash = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del m
    if cuda:
        torch.cuda.empty_cache()
    ref = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float16).to(FULL_DEVICE).eval()
    ref_ids, ref_logits = dense_greedy(ref, prompt, NEW_TOKENS, device=FULL_DEVICE)
    del ref
    if cuda:
        torch.cuda.empty_cache()
    n_same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
    k = max(1, n_same - len(prompt) + 1)                     # the steps whose inputs agree
    err = float((logits[:k] - ref_logits[:k]).abs().max())
    tol = tolerance(spec, ref_logits[:k])
    rec = {"model": spec.name, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "new_tokens": NEW_TOKENS,
           "tokens_identical": ids == ref_ids, "max_abs_logit_diff": err, "tolerance": tol,
           "tolerance_formula": "4 * n_layers * eps16 * max|logit|", "max_abs_logit": float(ref_logits.abs().max()),
           "smallest_top2_gap": top_gap(ref_logits), "ffn_cache_neurons": capacity,
           "new_neurons_per_token": float(np.mean([c.new_neurons for c in costs[1:]])),
           "bytes_per_token": float(np.mean([c.bytes for c in costs[1:]])), "flash_s": t_flash, "build_s": t_build,
           "convert_s": t_conv, "peak_gpu_gib_flash": peak_flash}
    print("\nfullsize exactness:", json.dumps(rec, indent=1))
    out = os.environ.get("FLASHLAB_FULLSIZE_OUT")
    if out:        # the benchmarks' results shape: a list of flat records, each with device and date
        import datetime as dt
        rec["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        Path(out).write_text(json.dumps([rec], indent=1) + "\n")
    assert ids == ref_ids, (f"greedy tokens differ from step {n_same - len(prompt)} (smallest top-2 gap of the dense "
                            f"logits {top_gap(ref_logits):.3g}, max diff before {err:.3g})")
    assert err <= tol, f"max |logit diff| {err:.3g} > tolerance {tol:.3g}"
