"""Kernel.launch's direct dispatch: after the autotuner has chosen a config for a key, the same key
launches the jit function with that config (no autotuner call); any other key goes through the
autotuner again. Fakes stand in for the jit function and triton.autotune (no GPU needed)."""

import pytest

pytest.importorskip("triton")

from real.kernels import _launch  # noqa: E402


class FakeConfig:
    def __init__(self, name: str):
        self.name, self.pre_hook = name, None

    def all_kwargs(self):
        return {"BLOCK": self.name, "num_warps": 4}


class FakeJit:
    arg_names = ["x", "n", "BLOCK", "HAS_BIAS"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw)) or "direct"


class FakeAutotuner:
    def __init__(self, fn, choose):
        self.fn, self.choose, self.runs, self.best_config = fn, choose, [], None

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.runs.append((args, kw))
            self.best_config = self.choose(args)
            return "tuned"
        return run


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


@pytest.fixture
def kernel(monkeypatch):
    made = []

    def autotune(configs, key, **_):
        def wrap(fn):
            made.append(FakeAutotuner(fn, lambda args: FakeConfig(f"cfg-n{args[1]}")))
            return made[-1]
        return wrap

    monkeypatch.setattr(_launch.triton, "autotune", autotune)
    k = _launch.Kernel(FakeJit(), {"one": []}, {"one": {}}, key=["n"])
    return k, made


def test_a_tuned_key_launches_directly_with_its_config(kernel):
    k, made = kernel
    x = FakeTensor("f16")
    assert k.launch("triton", "one", (1,), x, 512, HAS_BIAS=True) == "tuned"
    assert k.launch("triton", "one", (1,), x, 512, HAS_BIAS=True) == "direct"
    assert len(made[0].runs) == 1
    args, kw = k.jit_fn.calls[0]
    assert args == (x, 512) and kw == {"HAS_BIAS": True, "BLOCK": "cfg-n512", "num_warps": 4}
    assert k.best_config("one").name == "cfg-n512"


def test_another_key_dtype_or_flag_goes_through_the_autotuner(kernel):
    k, made = kernel
    k.launch("triton", "one", (1,), FakeTensor("f16"), 512, HAS_BIAS=True)
    k.launch("triton", "one", (1,), FakeTensor("f16"), 1024, HAS_BIAS=True)     # key arg differs
    k.launch("triton", "one", (1,), FakeTensor("bf16"), 512, HAS_BIAS=True)    # a tensor's dtype differs
    k.launch("triton", "one", (1,), FakeTensor("f16"), 512, HAS_BIAS=False)    # a constexpr differs
    assert len(made[0].runs) == 4 and not k.jit_fn.calls
    assert k.best_config("one").name == "cfg-n512"


def test_switched_off_or_tensor_keyword_always_autotunes(kernel):
    k, made = kernel
    k.launch("triton", "one", (1,), FakeTensor("f16"), 512, extra=FakeTensor("f16"))
    k.launch("triton", "one", (1,), FakeTensor("f16"), 512, extra=FakeTensor("f16"))
    k.direct_dispatch = False
    k.launch("triton", "one", (1,), FakeTensor("f16"), 256)
    k.launch("triton", "one", (1,), FakeTensor("f16"), 256)
    assert len(made[0].runs) == 4 and not k.jit_fn.calls
