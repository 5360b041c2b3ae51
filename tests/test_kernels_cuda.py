"""Compiled kernels on a CUDA device: what the interpreter cannot show (it runs one program's threads in lock
step, so a race between warps never happens there). Skipped without a GPU; run on the device with
`pytest tests/test_kernels_cuda.py`.

The kernels that read a sum and leave it zeroed (add+norm's consume=True, the several-token drain) are run
with every warp count the tuner may pick, many times, against float64: on the H200 (2026-12-02) add+norm
consuming 2 copies with 16 warps lost part of the sum in 3 of 3 runs before the barrier between its reads
and its zeroing (the compiler had given the two different thread layouts)."""

import importlib

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():   # checked before importing triton: CPU runs keep the interpreter's import order
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from real.kernels import add_layer_norm_reference, bundled_sparse_ffn  # noqa: E402

add_norm_module = importlib.import_module("real.kernels.add_norm")
sparse_ffn_module = importlib.import_module("real.kernels.sparse_ffn")
D = 4096
REPEATS = 20


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("num_warps", [4, 8, 16])
@pytest.mark.parametrize("copies", [1, 2, 4])
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_cuda_consuming_add_norm_reads_before_it_zeroes(copies, num_warps, pdl):
    g = torch.Generator(device="cuda").manual_seed(copies * 100 + num_warps)
    w, b = (torch.randn(D, device="cuda", generator=g).half() for _ in range(2))
    r = torch.randn(1, D, device="cuda", generator=g).half()
    tol = 2 * torch.finfo(torch.float16).eps
    for _ in range(REPEATS):
        x = 0.1 * torch.randn(copies, 1, D, device="cuda", generator=g)
        ref, ref_res = add_layer_norm_reference(x.clone(), r, w, b, consume=True)
        x2 = x.view(-1, D)
        out, res = torch.empty_like(r), torch.empty_like(r)
        add_norm_module._add_norm_kernel[(1,)](
            x2, r, w, b, out, res, D, 1e-5, x2.stride(0), r.stride(0), out.stride(0), res.stride(0), D,
            RMS=False, HAS_W=True, HAS_B=True, CONSUME=True, BLOCK=D, PDL=pdl, COPIES=copies, num_warps=num_warps,
            launch_pdl=pdl)
        assert _rel(res, ref_res) <= tol and _rel(out, ref) <= tol
        assert not x.any(), "every copy must be left zeroed"


@pytest.mark.parametrize("tokens", [2, 8])
def test_cuda_drained_ffn_reads_before_it_zeroes(tokens):
    """2..16 tokens: the persistent kernel adds into the workspace, the drain launch writes y and re-zeroes it."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    ff = 2048
    cache = (torch.randn(ff, 2 * D, device="cuda", generator=g) / D ** 0.5).half()
    for _ in range(REPEATS):
        x = torch.randn(tokens, D, device="cuda", generator=g).half()
        idx = torch.sort(torch.randperm(ff, device="cuda", generator=g)[:205]).values.int()
        y = bundled_sparse_ffn(x, cache, idx, method="fused")
        rows = cache[idx.long()].double()
        ref = torch.relu(x.double() @ rows[:, :D].T) @ rows[:, D:]
        assert _rel(y, ref) <= 2 * torch.finfo(torch.float16).eps + 4 * torch.finfo(torch.float32).eps * 205 ** 0.5
