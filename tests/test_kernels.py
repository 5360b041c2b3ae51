"""real/kernels on CPU: the Triton kernels through the Triton interpreter (TRITON_INTERPRET=1) and the torch
references, against float64 references on fresh random inputs.

Tolerances come from the dtype, not from the observed error (see `rel_tol`). The checks are norm-wise
(||y - ref|| / ||ref||) plus an element-wise bound scaled by the output's RMS, so a wrong, missing or doubled
row (each row carries about 1/sqrt(n_active) of ||y||, i.e. >= 6% here) fails by a wide margin.
"""

import importlib
import math
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see real/kernels/_launch.py)

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from real.kernels import (active_list, add_layer_norm, add_layer_norm_reference, add_rms_norm,  # noqa: E402
                          add_rms_norm_reference, backend_for, bundled_sparse_ffn, interpreting,
                          predict_active, predict_active_reference, predict_scores_reference, sparse_ffn,
                          sparse_ffn_reference, split_bundles)
sparse_ffn_module = importlib.import_module("real.kernels.sparse_ffn")  # the module (the package exports the function)

# If another test module imported triton first (real.engine imports the kernels), triton is compiled-only in
# this process: then every test here is skipped and `test_all_in_fresh_process` runs this file in a fresh
# interpreter-mode process instead, so the kernels are still tested whatever the collection order.
READY = interpreting()


@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    if not READY and request.node.name != "test_all_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_all_in_fresh_process runs this test")


def test_all_in_fresh_process():
    if READY:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

DTYPES = (torch.float16, torch.bfloat16)


def rel_tol(dtype, k: int) -> float:
    """Relative (norm-wise) tolerance for a kernel whose inputs are exactly representable in `dtype`.

    The float64 reference sees the same rounded inputs, so the kernel's only errors are:
    * rounding the output to dtype: at most eps/2 per element (unit roundoff u);
    * rounding the hidden activations h to dtype before the second product (tensor-core path): at most u per
      term; with independent signs these add like a random walk, i.e. about u * ||y|| in norm;
    * fp32 accumulation over k terms: worst case k * eps32, typically eps32 * sqrt(k) (random walk).
    So ~2u + eps32*sqrt(k) in norm; we allow 2*eps (4u) + 4*eps32*sqrt(k), a factor of ~2 of headroom over
    the worst sum of those terms and far below what a wrong row costs (>= 6% of ||y|| with our sizes).
    """
    return 2 * torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps * math.sqrt(k)


def assert_close(y, ref, dtype, k):
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed)"
    err = (y.double() - ref).norm() / ref.norm()
    tol = rel_tol(dtype, k)
    assert err <= tol, f"relative error {err:.3e} > {tol:.3e}"
    rms = ref.pow(2).mean().sqrt()
    worst = (y.double() - ref).abs().max() / rms
    assert worst <= 8 * tol, f"max element error {worst:.3e} x rms > {8 * tol:.3e}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ffn_inputs(seed, n_rows, d_model, tokens, frac, dtype, gated, with_bias):
    g = _gen(seed)
    width = (3 if gated else 2) * d_model
    cache = (torch.randn(n_rows, width, generator=g) / math.sqrt(d_model)).to(dtype)
    x = torch.randn(tokens, d_model, generator=g).to(dtype)
    n = round(frac * n_rows)
    idx = None if frac == 1.0 else torch.randperm(n_rows, generator=g)[:n].to(torch.int32)
    bias = (0.2 * torch.randn(n_rows, generator=g)).to(dtype) if with_bias else None
    return cache, x, idx, bias


def _ref(x, cache, idx, bias, gated, activation="relu", down_bias=None):
    gate, up, down = split_bundles(cache.double(), x.shape[-1], gated)
    return sparse_ffn_reference(x.double(), up, down, idx, gate=gate, activation=activation,
                                bias=None if bias is None else bias.double(),
                                down_bias=None if down_bias is None else down_bias.double())


# -- sparse FFN ---------------------------------------------------------------------------------------------
# (n_rows, d_model): non-powers of two and a d_model smaller than one tile
SHAPES = [(300, 200), (77, 48)]
FRACS = [0.0, 0.5, 0.97, 1.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("frac", FRACS)
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=["300x200", "77x48"])
def test_bundled_ffn_matches_float64(shape, tokens, frac, dtype):
    n_rows, d_model = shape
    seed = hash((shape, tokens, frac, str(dtype))) % 2**31
    cache, x, idx, bias = _ffn_inputs(seed, n_rows, d_model, tokens, frac, dtype, gated=False, with_bias=True)
    y = bundled_sparse_ffn(x, cache, idx, bias=bias)
    if frac == 0.0:
        assert torch.count_nonzero(y) == 0 and y.shape == x.shape
        return
    assert_close(y, _ref(x, cache, idx, bias, gated=False), dtype, d_model)


@pytest.mark.parametrize("method,dtype", [(m, d) for m in ("fused", "two_phase", "fused_tc") for d in DTYPES]
                         + [("per_block", torch.float16)],  # v1 kernel: shares its arithmetic with 'fused'
                         ids=lambda v: {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(v, v))
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
def test_methods_and_gated(gated, tokens, dtype, method):
    cache, x, idx, bias = _ffn_inputs(7 + tokens, 150, 72, tokens, 0.5, dtype, gated, with_bias=not gated)
    y = bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, method=method)
    assert_close(y, _ref(x, cache, idx, bias, gated), dtype, 72)


@pytest.mark.parametrize("config,tokens", [
    ({"BLOCK_R": 2, "BLOCK_D": 128, "WHOLE_ROW": True}, 1),   # one tile spans the row (d_model 72 <= 128)
    ({"BLOCK_R": 4, "BLOCK_D": 16, "WHOLE_ROW": False}, 1),   # many D chunks, ragged last one
    ({"BLOCK_R": 32, "BLOCK_D": 32, "WHOLE_ROW": False}, 1),  # more rows per program than some sets have
    ({"BLOCK_R": 4, "BLOCK_D": 128, "WHOLE_ROW": True}, 3),   # several tokens per whole-row program
    ({"BLOCK_R": 1, "BLOCK_D": 128, "WHOLE_ROW": True}, 9),
], ids=["whole-row", "narrow", "wide", "whole-row-3tok", "whole-row-9tok"])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
def test_block_configs(config, tokens, gated):
    cache, x, idx, bias = _ffn_inputs(11, 90, 72, tokens, 0.3, torch.float16, gated, with_bias=not gated)
    y = bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, config=config, method="per_block")
    assert_close(y, _ref(x, cache, idx, bias, gated), torch.float16, 72)


@pytest.mark.parametrize("config,tokens,frac", [
    ({"BLOCK_R": 1, "BLOCK_D": 128, "N_ACC": 1, "PROGS_PER_SM": 1}, 1, 0.3),  # 27 rows over 4 programs
    ({"BLOCK_R": 4, "BLOCK_D": 128, "N_ACC": 3, "PROGS_PER_SM": 2}, 1, 0.97),  # copies of the accumulator
    ({"BLOCK_R": 2, "BLOCK_D": 128, "N_ACC": 2, "PROGS_PER_SM": 1}, 1, 0.02),  # fewer blocks than programs
    ({"BLOCK_R": 2, "BLOCK_D": 128, "N_ACC": 2, "PROGS_PER_SM": 1}, 7, 1.0),   # all rows, several tokens (+drain; N_ACC unused)
    ({"BLOCK_R": 4, "BLOCK_D": 128, "N_ACC": 1, "PROGS_PER_SM": 8}, 2, 0.3),   # more programs than blocks
], ids=["R1", "R4-acc3", "sparse", "all-7tok", "idle-programs"])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
def test_persistent_configs(config, tokens, frac, gated):
    """The persistent kernel (4 programs per 'SM' on CPU): each program loops over a share of the rows."""
    cache, x, idx, bias = _ffn_inputs(12, 90, 72, tokens, frac, torch.float16, gated, with_bias=not gated)
    y = bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, config=config)
    assert_close(y, _ref(x, cache, idx, bias, gated), torch.float16, 72)


def test_out_argument_and_its_checks():
    cache, x, idx, bias = _ffn_inputs(14, 60, 40, 3, 0.5, torch.float16, False, with_bias=True)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    assert bundled_sparse_ffn(x, cache, idx, bias=bias, out=out) is out
    assert_close(out, _ref(x, cache, idx, bias, False), torch.float16, 40)
    with pytest.raises(ValueError, match="out"):
        bundled_sparse_ffn(x, cache, idx, bias=bias, out=out[:2])


@pytest.mark.parametrize("impl,method", [("auto", "fused"), ("auto", "two_phase"), ("auto", "two_phase:tf32"),
                                         ("torch", "auto")])
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
@pytest.mark.parametrize("copies", [None, 3], ids=["one-sum", "3-copies"])
def test_accumulate_adds_in_fp32(copies, gated, tokens, impl, method, monkeypatch):
    """accumulate=: two calls over disjoint row sets (as the engine's resident and new rows) add into one
    fp32 buffer that held something already; the sum is y (+ down bias) of all rows in fp32, not rounded to
    the weights' dtype. Tolerance: fp32 accumulation over k terms (4 eps32 sqrt(k)), plus the rounding of
    adding into the buffer's prior content (eps32 per add, relative to that content). Two-phase with several
    tokens multiplies h on tensor cores as a sum of terms of the weights' dtype (or, ':tf32', as two tf32
    terms): the same fp32-level bound. With copies the sum over the copies is checked, and 'fused' (several
    programs: 4 fake SMs on CPU) must have spread its programs over more than one copy."""
    method, _, product = method.partition(":")
    monkeypatch.setattr(sparse_ffn_module, "DOWN_PRODUCT", product or "split")
    d_model, dtype = 72, torch.float16
    cache, x, idx, bias = _ffn_inputs(21 + tokens, 150, d_model, tokens, 0.6, dtype, gated, with_bias=not gated)
    down_bias = None if gated else torch.randn(d_model, generator=_gen(22)).to(dtype)
    g = _gen(23)
    acc0 = torch.randn(*(() if copies is None else (copies,)), tokens, d_model, generator=g)
    acc = acc0.clone()
    half = idx.numel() // 2
    first = bundled_sparse_ffn(x, cache, idx[:half], gated=gated, bias=bias, down_bias=down_bias, impl=impl,
                               accumulate=acc, method=method)
    assert first is acc
    count = torch.tensor([idx.numel() - half], dtype=torch.int32)          # device-side count, second call
    bundled_sparse_ffn(x, cache, torch.cat([idx[half:], idx[:3]]), gated=gated, bias=bias, impl=impl,
                       count=count, accumulate=acc, method=method)
    ref = _ref(x, cache, idx, bias, gated, down_bias=down_bias)
    eps32 = torch.finfo(torch.float32).eps
    added = acc.double() - acc0.double()
    if copies is not None:
        spread = sum(bool((acc[c] != acc0[c]).any()) for c in range(copies))
        assert spread > 1 if (method == "fused" and impl == "auto") else spread == 1, spread
        added = added.sum(0)
    err = (added - ref).norm() / ref.norm()
    tol = 4 * eps32 * math.sqrt(max(d_model, idx.numel())) + 4 * eps32 * float(acc0.norm() / ref.norm())
    assert acc.dtype == torch.float32 and err <= tol, f"relative error {err:.3e} > {tol:.3e}"


def test_accumulate_checks():
    cache, x, idx, _ = _ffn_inputs(24, 40, 32, 2, 0.5, torch.float16, False, with_bias=False)
    with pytest.raises(ValueError, match="accumulate: expected a contiguous float32"):
        bundled_sparse_ffn(x, cache, idx, accumulate=torch.zeros(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="accumulate: expected"):
        bundled_sparse_ffn(x, cache, idx, accumulate=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="accumulate: only method 'fused'"):
        bundled_sparse_ffn(x, cache, idx, method="per_block", accumulate=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="out: not with accumulate"):
        bundled_sparse_ffn(x, cache, idx, out=torch.empty_like(x), accumulate=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="N_ACC=4 with an accumulate buffer of 1 copies"):
        bundled_sparse_ffn(x, cache, idx, accumulate=torch.zeros(2, 32),
                           config={"BLOCK_R": 2, "BLOCK_D": 32, "N_ACC": 4, "PROGS_PER_SM": 1})
    with pytest.raises(ValueError, match=r"accumulate: expected .*\[copies <= 8"):
        bundled_sparse_ffn(x, cache, idx, accumulate=torch.zeros(9, 2, 32))
    with pytest.raises(ValueError, match="pdl: only method='fused'"):
        bundled_sparse_ffn(x, cache, idx, method="two_phase", pdl=True)
    with pytest.raises(ValueError, match="pdl='early': one token only"):
        bundled_sparse_ffn(x, cache, idx, pdl="early")
    with pytest.raises(ValueError, match="pdl='early'.*count=None"):
        bundled_sparse_ffn(x[:1], cache, idx, count=torch.tensor([1], dtype=torch.int32), pdl="early")
    with pytest.raises(ValueError, match="pdl: expected False, True or 'early'"):
        bundled_sparse_ffn(x, cache, idx, pdl="yes")
    acc = torch.ones(0, 32)                                  # no tokens: nothing added, nothing launched
    assert bundled_sparse_ffn(x[:0], cache, idx, accumulate=acc) is acc
    assert bundled_sparse_ffn(x[:0], cache, idx).shape == (0, 32)


def test_wide_rows_fall_back_to_one_launch_per_token():
    """d_model > 8192 does not fit a whole-row tile: tokens go one launch each, same function."""
    cache, x, idx, bias = _ffn_inputs(13, 6, 8200, 2, 0.5, torch.float16, False, with_bias=True)
    y = bundled_sparse_ffn(x, cache, idx, bias=bias)
    assert_close(y, _ref(x, cache, idx, bias, False), torch.float16, 8200)


def test_whole_row_config_must_cover_the_row():
    cache, x, idx, _ = _ffn_inputs(2, 40, 72, 1, 0.5, torch.float16, False, with_bias=False)
    with pytest.raises(ValueError, match="BLOCK_D >= d_model"):
        bundled_sparse_ffn(x, cache, idx, config={"BLOCK_R": 2, "BLOCK_D": 64, "WHOLE_ROW": True},
                           method="per_block")
    with pytest.raises(ValueError, match="BLOCK_D >= d_model"):
        bundled_sparse_ffn(x, cache, idx, config={"BLOCK_R": 2, "BLOCK_D": 64, "N_ACC": 1, "PROGS_PER_SM": 1})
    with pytest.raises(ValueError, match="N_ACC must be in"):   # more copies than the workspace holds
        bundled_sparse_ffn(x, cache, idx, config={"BLOCK_R": 2, "BLOCK_D": 128, "N_ACC": 9, "PROGS_PER_SM": 1})


def test_relu2_down_bias_and_token_batches():
    """Squared ReLU, the fused down bias, int64 indices and > 16 tokens (split into launches)."""
    cache, x, idx, bias = _ffn_inputs(5, 64, 40, 19, 0.5, torch.float16, False, with_bias=True)
    down_bias = torch.randn(40, generator=_gen(6)).to(torch.float16)
    y = bundled_sparse_ffn(x, cache, idx.long(), bias=bias, down_bias=down_bias, activation="relu2")
    ref = _ref(x, cache, idx.long(), bias, False, activation="relu2", down_bias=down_bias)
    assert_close(y, ref, torch.float16, 40)


def test_unbundled_strided_layouts():
    """Separate matrices, down given as a transposed fc2 weight (column-strided): same function."""
    g = _gen(3)
    d_model, n_rows = 56, 120
    fc1 = (torch.randn(n_rows, d_model, generator=g) / 8).to(torch.bfloat16)      # [d_ff, d_model]
    fc2 = (torch.randn(d_model, n_rows, generator=g) / 8).to(torch.bfloat16)      # [d_model, d_ff]
    x = torch.randn(2, d_model, generator=g).to(torch.bfloat16)
    idx = torch.randperm(n_rows, generator=g)[:60].to(torch.int32)
    y = sparse_ffn(x, fc1, fc2.t(), idx)
    ref = sparse_ffn_reference(x.double(), fc1.double(), fc2.t().double(), idx)
    assert_close(y, ref, torch.bfloat16, d_model)


def test_one_dim_input_and_torch_fallback():
    cache, x, idx, bias = _ffn_inputs(9, 50, 32, 1, 0.5, torch.float16, False, with_bias=True)
    y = bundled_sparse_ffn(x[0], cache, idx, bias=bias)
    assert y.shape == (32,)
    y_torch = bundled_sparse_ffn(x[0], cache, idx, bias=bias, impl="torch")
    ref = _ref(x, cache, idx, bias, False)[0]
    assert_close(y, ref, torch.float16, 32)
    assert_close(y_torch, ref, torch.float16, 32)


@pytest.mark.parametrize("method", ["fused", "two_phase"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_workspace_is_left_clean(tokens, method):
    """The fused and two-phase kernels (one token: the last program's finish; several: the drain launch)
    leave their fp32 workspace and ticket at zero, so back-to-back calls give identical results; the down
    bias is added exactly once."""
    cache, x, idx, bias = _ffn_inputs(4, 100, 48, tokens, 0.5, torch.float16, False, with_bias=True)
    down_bias = torch.randn(48, generator=_gen(40)).to(torch.float16)
    first = bundled_sparse_ffn(x, cache, idx, bias=bias, down_bias=down_bias, method=method)
    second = bundled_sparse_ffn(x, cache, idx, bias=bias, down_bias=down_bias, method=method)
    assert torch.equal(first, second)
    assert_close(first, _ref(x, cache, idx, bias, False, down_bias=down_bias), torch.float16, 48)
    assert sparse_ffn_module._WORKSPACES, "the kernel path used no workspace"
    for acc, ticket in sparse_ffn_module._WORKSPACES.values():
        assert not acc.any() and not ticket.any()


def test_auto_method_choice(monkeypatch):
    """method='auto' (the default): the one-launch kernel for one token, two-phase for several, and the
    one-launch kernel whenever an option only it has is asked for (pdl, a fixed config)."""
    launch, seen = sparse_ffn_module._launch, []
    monkeypatch.setattr(sparse_ffn_module, "_launch", lambda *a, **k: (seen.append(a[10]), launch(*a, **k))[1])
    cache, x, idx, bias = _ffn_inputs(8, 60, 32, 3, 0.5, torch.float16, False, with_bias=True)
    cases = [(x[:1], {}, "fused"), (x, {}, "two_phase"), (x, {"pdl": True}, "fused"),
             (x, {"accumulate": torch.zeros(3, 32)}, "two_phase"), (x[:1], {"accumulate": torch.zeros(1, 32)}, "fused"),
             (x, {"config": {"BLOCK_R": 2, "BLOCK_D": 32, "N_ACC": 1, "PROGS_PER_SM": 1}}, "fused")]
    for xs, kwargs, want in cases:
        seen.clear()
        y = bundled_sparse_ffn(xs, cache, idx, bias=bias, **kwargs).to(xs.dtype)   # accumulate: fp32
        assert seen[0] == want, (xs.shape, kwargs, seen)
        assert_close(y, _ref(xs, cache, idx, bias, False), torch.float16, 32)


@pytest.mark.parametrize("product", ["split", "tf32"])
@pytest.mark.parametrize("z", [20.0, 320.0], ids=["h-4e2", "h-1e5"])
def test_two_phase_keeps_large_hidden_values(z, product, monkeypatch):
    """relu2 with x.up = z gives h = z^2; at z = 320, h = 102400 is beyond fp16's range (65504), which the
    tensor-core product must not round to inf (split: h in fp16 terms, such a tile scaled by 2^-16; tf32 has
    fp32's range)."""
    monkeypatch.setattr(sparse_ffn_module, "DOWN_PRODUCT", product)
    d_model, n_rows, tokens = 32, 20, 3
    x = torch.ones(tokens, d_model, dtype=torch.float16)
    up = torch.full((n_rows, d_model), z / d_model, dtype=torch.float16)
    down = (torch.randn(n_rows, d_model, generator=_gen(50)) * (1.0 / z ** 2)).to(torch.float16)
    ref = sparse_ffn_reference(x.double(), up.double(), down.double(), activation="relu2")
    for method in ("auto", "fused"):
        y = sparse_ffn(x, up, down, activation="relu2", method=method)
        assert_close(y, ref, torch.float16, n_rows)


def test_bad_inputs_name_the_field():
    cache, x, idx, _ = _ffn_inputs(1, 20, 16, 1, 0.5, torch.float16, False, with_bias=False)
    with pytest.raises(ValueError, match="cache"):
        bundled_sparse_ffn(x, cache[:, :20], idx)
    with pytest.raises(ValueError, match="activation"):
        bundled_sparse_ffn(x, cache, idx, activation="gelu")
    with pytest.raises(ValueError, match="idx"):
        bundled_sparse_ffn(x, cache, idx.float())
    with pytest.raises(ValueError, match="up"):
        bundled_sparse_ffn(x.float(), cache, idx)
    with pytest.raises(ValueError, match="bias"):
        bundled_sparse_ffn(x, torch.zeros(20, 48, dtype=torch.float16), idx, gated=True,
                           bias=torch.zeros(20, dtype=torch.float16))


def test_backend_choice():
    t = torch.zeros(2)
    assert backend_for(t) == "interpret"
    assert backend_for(t, "torch") == "torch"
    with pytest.raises(ValueError, match="impl"):
        backend_for(t, "cuda")


# -- predictor ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("threshold", [-1e9, 0.8, 1e9], ids=["all", "some", "none"])
def test_predictor_matches_float64(tokens, threshold, dtype):
    g = _gen(tokens)
    d_model, rank, d_ff = 136, 24, 333
    x = torch.randn(tokens, d_model, generator=g).to(dtype)
    A = (torch.randn(d_model, rank, generator=g) / math.sqrt(d_model)).to(dtype)
    B = (torch.randn(rank, d_ff, generator=g) / math.sqrt(rank)).to(dtype)
    idx, count = predict_active(x, A, B, threshold)
    assert idx.dtype == torch.int32 and count.dtype == torch.int32 and idx.shape == (d_ff,)
    got = active_list(idx, count)
    assert torch.equal(got, torch.unique(got)), "an index was written twice"
    scores = predict_scores_reference(x.double(), A.double(), B.double())
    want = active_list(*predict_active_reference(x.double(), A.double(), B.double(), threshold))
    # a neuron may only flip where its float64 score is within rounding of the threshold (tokens > 1 round the
    # rank-r projection to dtype before the tensor-core product, hence the dtype's eps)
    margin = rel_tol(dtype, d_model) * scores.abs().max()
    for i in set(got.tolist()) ^ set(want.tolist()):
        assert (scores[:, i] - threshold).abs().min() <= margin, f"neuron {i} misclassified"
    if threshold > 1e8:
        assert int(count) == 0
    if threshold < -1e8:
        assert int(count) == d_ff


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("d_model", [1100, 2600])
def test_predictor_split_over_d_model_matches_float64(d_model, tokens):
    """split_k=None runs x A in d_model slices of ~512 (2 and 5 here, the last one ragged)."""
    g = _gen(d_model + tokens)
    rank, d_ff, dtype, threshold = 20, 150, torch.float16, 0.3
    x = torch.randn(tokens, d_model, generator=g).to(dtype)
    A = (torch.randn(d_model, rank, generator=g) / math.sqrt(d_model)).to(dtype)
    B = (torch.randn(rank, d_ff, generator=g) / math.sqrt(rank)).to(dtype)
    got = active_list(*predict_active(x, A, B, threshold, split_k=None))
    scores = predict_scores_reference(x.double(), A.double(), B.double())
    want = active_list(*predict_active_reference(x.double(), A.double(), B.double(), threshold))
    assert 0 < want.numel() < d_ff
    margin = rel_tol(dtype, d_model) * scores.abs().max()
    for i in set(got.tolist()) ^ set(want.tolist()):
        assert (scores[:, i] - threshold).abs().min() <= margin, f"neuron {i} misclassified"


@pytest.mark.parametrize("tokens", [1, 5])
def test_predictor_bias_matches_float64(tokens):
    """A trained predictor's per-neuron offset: ((x A) B + bias) > threshold."""
    g = _gen(300 + tokens)
    d_model, rank, d_ff, dtype, threshold = 72, 12, 257, torch.bfloat16, 0.1
    x = torch.randn(tokens, d_model, generator=g).to(dtype)
    A = (torch.randn(d_model, rank, generator=g) / math.sqrt(d_model)).to(dtype)
    B = (torch.randn(rank, d_ff, generator=g) / math.sqrt(rank)).to(dtype)
    bias = (2 * torch.randn(d_ff, generator=g)).to(dtype)         # moves many neurons across the threshold
    got = active_list(*predict_active(x, A, B, threshold, bias=bias))
    scores = predict_scores_reference(x.double(), A.double(), B.double(), bias.double())
    want = active_list(*predict_active_reference(x.double(), A.double(), B.double(), threshold, bias.double()))
    without = active_list(*predict_active_reference(x.double(), A.double(), B.double(), threshold))
    assert not torch.equal(want, without), "the bias must matter in this case"
    margin = rel_tol(dtype, d_model) * scores.abs().max()
    for i in set(got.tolist()) ^ set(want.tolist()):
        assert (scores[:, i] - threshold).abs().min() <= margin, f"neuron {i} misclassified"
    with pytest.raises(ValueError, match="bias"):
        predict_active(x, A, B, threshold, bias=bias[:-1])


def test_predictor_pdl_argument():
    """On CPU pdl=True must change nothing (the interpreter has no griddepcontrol, so no PDL launch arguments
    may reach it), and a bad value is named. The PDL launch itself is checked on the GPU by bench_kernels."""
    g = _gen(33)
    x = torch.randn(2, 96, generator=g).to(torch.float16)
    A = (torch.randn(96, 16, generator=g) / 10).to(torch.float16)
    B = (torch.randn(16, 130, generator=g) / 4).to(torch.float16)
    assert torch.equal(active_list(*predict_active(x, A, B, 0.3, pdl=True)),
                       active_list(*predict_active(x, A, B, 0.3)))
    with pytest.raises(ValueError, match="pdl: expected False or True"):
        predict_active(x, A, B, 0.3, pdl="early")


def test_predictor_feeds_sparse_ffn_without_host_count():
    g = _gen(21)
    d_model, rank, d_ff = 64, 16, 200
    x = torch.randn(1, d_model, generator=g).to(torch.float16)
    A = (torch.randn(d_model, rank, generator=g) / 8).to(torch.float16)
    B = (torch.randn(rank, d_ff, generator=g) / 4).to(torch.float16)
    cache = (torch.randn(d_ff, 2 * d_model, generator=g) / 8).to(torch.float16)
    idx, count = predict_active(x, A, B, 0.5)
    assert 0 < int(count) < d_ff
    for method in ("fused", "per_block", "two_phase"):
        y = bundled_sparse_ffn(x, cache, idx, count=count, method=method)
        assert_close(y, _ref(x, cache, active_list(idx, count), None, False), torch.float16, d_model)


# -- fused add + norm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 300), (5, 64), (2, 3, 129)], ids=["1x300", "5x64", "2x3x129"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_add_norm_matches_float64(norm, shape, dtype):
    g = _gen(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    r = (3 * torch.randn(*shape, generator=g) + 1).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    b = torch.randn(shape[-1], generator=g).to(dtype)
    if norm == "layer":
        out, new_res = add_layer_norm(x, r, w, b)
        s = (x + r).double()  # the reference normalises the same rounded sum that the kernel returns
        ref = torch.nn.functional.layer_norm(s, shape[-1:], w.double(), b.double(), 1e-5)
        ref_out, ref_res = add_layer_norm_reference(x, r, w, b)
    else:
        out, new_res = add_rms_norm(x, r, w)
        s = (x + r).double()
        ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        ref_out, ref_res = add_rms_norm_reference(x, r, w)
    assert torch.equal(new_res, x + r), "new residual must equal torch's x + residual exactly"
    assert torch.equal(ref_res, new_res)
    assert_close(out, ref, dtype, shape[-1])
    assert_close(ref_out, ref, dtype, shape[-1])


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_accumulating_ffn_then_consuming_add_norm(norm, dtype, impl):
    """The FFN's fused form: sparse_ffn(accumulate=acc) adds y in fp32, add+norm(acc, residual, consume=True)
    reads it and leaves it zeroed, so a second layer's pair gives that layer's own result (nothing left over).
    The new residual is (y32 + residual) rounded once to the dtype; normed is checked against float64 on that
    same rounded sum (dtype tolerance)."""
    d_model, tokens = 72, 3
    add_norm = add_layer_norm if norm == "layer" else add_rms_norm
    w = torch.randn(d_model, generator=_gen(31)).to(dtype)
    for layer, copies in enumerate((None, 4, 1)):     # one sum, then copies of it (the FFN spreads over them)
        acc = torch.zeros(*(() if copies is None else (copies,)), tokens, d_model)
        cache, x, idx, bias = _ffn_inputs(32 + layer, 150, d_model, tokens, 0.6, dtype, False, with_bias=True)
        residual = (3 * torch.randn(tokens, d_model, generator=_gen(40 + layer))).to(dtype)
        bundled_sparse_ffn(x, cache, idx, bias=bias, impl=impl, accumulate=acc)
        y64 = _ref(x, cache, idx, bias, False)
        y32 = acc.clone() if copies is None else sum(acc[c] for c in range(copies))
        assert_close(y32, y64, torch.float32, d_model)
        out, new_res = add_norm(acc, residual, w, consume=True, impl=impl)
        assert not acc.any(), "the consumed sum must be left zeroed for the next accumulating launch"
        assert new_res.dtype == dtype and out.dtype == dtype
        assert torch.equal(new_res, (y32 + residual.float()).to(dtype))
        s = new_res.double()
        ref = (torch.nn.functional.layer_norm(s, (d_model,), w.double(), None, 1e-5) if norm == "layer"
               else s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())
        assert_close(out, ref, dtype, d_model)


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(3, 72), (72,)], ids=["rows", "1-D"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_consuming_add_norm_adds_up_every_copy(norm, shape, impl):
    """consume=True with an FFN sum in copies [c, *residual.shape]: the copies (all non-zero here) are added up
    in order in fp32, the new residual is that sum + residual rounded once, and every copy is left zeroed."""
    dtype, copies = torch.float16, 4
    add_norm = add_layer_norm if norm == "layer" else add_rms_norm
    g = _gen(45)
    x = torch.randn(copies, *shape, generator=g)
    residual = (3 * torch.randn(*shape, generator=g)).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    total = x[0].clone()
    for c in range(1, copies):
        total += x[c]
    out, new_res = add_norm(x, residual, w, consume=True, impl=impl)
    assert not x.any(), "every copy of the consumed sum must be left zeroed"
    assert new_res.shape == residual.shape and torch.equal(new_res, (total + residual.float()).to(dtype))
    s64 = new_res.double()
    ref = (torch.nn.functional.layer_norm(s64, shape[-1:], w.double(), None, 1e-5) if norm == "layer"
           else s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())
    assert_close(out, ref, dtype, shape[-1])


def test_add_norm_rejects_mismatch():
    x = torch.zeros(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, torch.zeros(2, 9, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, x, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="consume: x must be a contiguous float32"):
        add_layer_norm(x, x, consume=True)
    with pytest.raises(ValueError, match="x: shape .* needs consume=True"):   # copies only when consumed
        add_layer_norm(torch.zeros(3, 2, 8), x)
    for copies in (0, 9):
        with pytest.raises(ValueError, match=r"1\.\.8 copies"):
            add_layer_norm(torch.zeros(copies, 2, 8), x, consume=True)
    with pytest.raises(ValueError, match="pdl: expected False or True"):
        add_rms_norm(x, x, pdl="early")


def test_wait_flag_passes_a_raised_flag_and_reports_a_timeout_stickily():
    """The engine's device wait (real/kernels/wait_flag.py) in the interpreter: a raised flag lets it through,
    a flag never raised gives up after max_polls and sets timed_out, which a later good wait leaves set."""
    from real.kernels.wait_flag import _wait_flag
    flag = torch.tensor([3], dtype=torch.int32)
    timed_out = torch.zeros(1, dtype=torch.int32)
    _wait_flag[(1,)](flag, 3, 50, timed_out)
    assert int(timed_out[0]) == 0
    _wait_flag[(1,)](flag, 4, 50, timed_out)
    assert int(timed_out[0]) == 1
    _wait_flag[(1,)](flag, 2, 50, timed_out)
    assert int(timed_out[0]) == 1


@pytest.mark.parametrize("d_model,gated", [(4096, False), (4096, True), (5120, False), (8192, True)])
def test_early_config_keeps_two_blocks_in_registers(d_model, gated):
    """pdl='early' holds two blocks per program before the wait: 4-row blocks when a program's share fits them,
    never more weight halves per thread than the register budget that prunes the autotuner's configs."""
    k = 3 if gated else 2
    for n_rows in (0, 100, 819, 1056, 1638, 16384, *range(1057, 2113, 37)):
        cfg = sparse_ffn_module.early_config(n_rows, 132, d_model, gated)
        assert cfg["BLOCK_D"] >= d_model and cfg["PROGS_PER_SM"] == 1 and cfg["N_ACC"] == 1
        halves = 2 * k * cfg["BLOCK_R"] * cfg["BLOCK_D"]
        assert halves <= sparse_ffn_module.TILE_HALVES_PER_THREAD * 32 * cfg["num_warps"], (n_rows, cfg)
        if n_rows > 8 * 132 and cfg["BLOCK_R"] == 4:     # whole-block shares: the longest within the bound
            assert _longest_share(n_rows, 4, 132) <= sparse_ffn_module.EARLY_TAIL_MAX * n_rows / 132, (n_rows, cfg)
    assert sparse_ffn_module.early_config(819, 132, 4096, False)["BLOCK_R"] == 4


def _longest_share(n_rows: int, block_r: int, sms: int) -> int:
    """Rows of the longest program share, counted as the persistent kernel assigns them: min(blocks, sms)
    programs, program p taking blocks [p * blocks // G, (p + 1) * blocks // G)."""
    blocks = -(-n_rows // block_r)
    G = max(1, min(blocks, sms))
    return max(min((p + 1) * blocks // G * block_r, n_rows) - p * blocks // G * block_r for p in range(G))


@pytest.mark.parametrize("n_rows,gated,block_r", [(819, False, 4), (1311, False, 4), (1638, False, 2),
                                                  (1966, False, 4), (881, True, 4), (1101, True, 1),
                                                  (1321, True, 4)])
def test_early_config_picks_the_measured_best(n_rows, gated, block_r):
    """The sweep's fastest block sizes at OPT-6.7B's / Llama-2-7B's shapes on 132 SMs
    (benchmarks/probes/results/early_config_sweep.txt): 4-row blocks unless they leave some programs a block more than the
    rest, then 2-row (gated 1-row)."""
    assert sparse_ffn_module.early_config(n_rows, 132, 4096, gated)["BLOCK_R"] == block_r


def test_early_config_keeps_the_earlier_rule_for_wide_gated_rows():
    """1-row gated blocks were measured at d_model 4096 only; where 4-row gated tiles do not fit (d_model 8192)
    the earlier rule's 2-row blocks stay."""
    assert sparse_ffn_module.early_config(1500, 132, 8192, True)["BLOCK_R"] == 2


@pytest.mark.parametrize("block_r,progs", [(1, 1), (2, 1), (4, 1), (2, 2)])
@pytest.mark.parametrize("with_idx", [True, False], ids=["idx", "all-rows"])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated"])
def test_early_launch_path_matches_float64(gated, with_idx, block_r, progs, monkeypatch):
    """pdl='early' compiles a different prologue (PDL 2: two blocks requested before the wait, the first one
    peeled off the loop). The interpreter has no griddepcontrol, so here the wait and the launch signal are
    no-ops and PDL 2 is passed as a plain constexpr: the peeled block and the loop must still cover every row
    exactly once, for shares of 0, 1, 2 and more blocks, finishing and accumulating."""
    monkeypatch.setattr(sparse_ffn_module, "gdc_wait", lambda: None)
    monkeypatch.setattr(sparse_ffn_module, "gdc_launch_dependents", lambda: None)
    monkeypatch.setattr(sparse_ffn_module, "pdl_args", lambda level, backend: {"PDL": level} if level else {})
    config = {"BLOCK_R": block_r, "BLOCK_D": 64, "N_ACC": 1, "PROGS_PER_SM": progs}
    for n_active in (0, 1, 3, 9, 30):
        cache, x, idx, bias = _ffn_inputs(60 + n_active, 80, 48, 1, 0.5, torch.float16, gated,
                                          with_bias=not gated)
        idx = idx[:n_active]
        if not with_idx:                     # all rows of a cache of just the active rows
            cache, bias = cache[idx.long()], None if bias is None else bias[idx.long()]
            idx = None
        ref = _ref(x, cache, idx, bias, gated)
        y = bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, pdl="early", config=config)
        acc = torch.zeros(x.shape)
        bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, pdl="early", config=config, accumulate=acc)
        copies = torch.zeros(2, *x.shape)    # the same launch spread over two copies of the sum
        bundled_sparse_ffn(x, cache, idx, gated=gated, bias=bias, pdl="early", config=config, accumulate=copies)
        if not ref.any():                    # no rows, or none fires (relu of one row can be 0)
            assert not y.any() and not acc.any() and not copies.any()
            continue
        assert_close(y, ref, torch.float16, 48)
        assert_close(acc.to(torch.float16), ref, torch.float16, 48)
        assert_close((copies[0] + copies[1]).to(torch.float16), ref, torch.float16, 48)


def test_down_product_is_validated(monkeypatch):
    cache, x, idx, _ = _ffn_inputs(70, 30, 32, 3, 0.5, torch.float16, False, with_bias=False)
    monkeypatch.setattr(sparse_ffn_module, "DOWN_PRODUCT", "TF32")
    with pytest.raises(ValueError, match="DOWN_PRODUCT: unknown 'TF32'"):
        bundled_sparse_ffn(x, cache, idx, method="two_phase")


@pytest.mark.parametrize("n_rows,indexed,fixed", [(819, True, True), (819, False, True), (1056, False, True),
                                                  (1057, False, False), (1638, True, True),
                                                  (1638, False, False), (2112, True, True), (2113, True, False)])
def test_early_pick_fixes_configs_only_where_measured(n_rows, indexed, fixed):
    """pdl='early' takes early_config up to 16 rows a program with an index and 8 without (where the two early
    blocks hold the whole share); beyond, the tuner picks (None)."""
    cfg = sparse_ffn_module.early_pick(n_rows, 132, 4096, False, indexed)
    assert (cfg is not None) == fixed
    if fixed:
        assert cfg == sparse_ffn_module.early_config(n_rows, 132, 4096, False)
