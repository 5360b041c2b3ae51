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
    yield k, made
    _launch.KERNELS.remove(k)


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


def test_direct_dispatch_agrees_with_the_real_autotuner(monkeypatch):
    """Triton's own Autotuner (fake kernel, random timings): over many calls mixing key values, dtypes,
    flags and key arguments given by keyword, each direct launch uses the config the autotuner chose for
    that key, and the direct path is taken."""
    import random

    import triton

    rng = random.Random(0)
    monkeypatch.setattr(_launch, "_bench", lambda call, quantiles: rng.random())

    def body(x, n, m, y, BLOCK, FLAG):
        pass

    class Jit:
        arg_names = ["x", "n", "m", "y", "BLOCK", "FLAG"]
        fn = staticmethod(body)

        def __init__(self):
            self.direct = 0

        def run(self, *args, grid=None, warmup=False, **kw):
            return kw["BLOCK"]

        def __getitem__(self, grid):
            def launch(*args, **kw):
                self.direct += 1
                return self.run(*args, grid=grid, **kw)
            return launch

    jit = Jit()
    k = _launch.Kernel(jit, {"one": [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64, 128)]},
                       {"one": {}}, key=["n", "FLAG"])
    try:
        first = {}
        for _ in range(600):
            n, m, dt, flag = rng.choice([1, 2, 3]), rng.choice([5, 6]), rng.choice(["f16", "bf16"]), rng.random() < 0.5
            if rng.random() < 0.3:
                used = k.launch("triton", "one", (1,), FakeTensor(dt), n=n, m=m, y=FakeTensor("f32"), FLAG=flag)
            else:
                used = k.launch("triton", "one", (1,), FakeTensor(dt), n, m, FakeTensor("f32"), FLAG=flag)
            assert first.setdefault((n, flag, dt), used) == used
        # ~70% of the calls are positional (repeats of 48 keys go direct); a tensor passed by keyword
        # (the other ~30%) always goes through the autotuner
        assert 300 < jit.direct < 600 - 100 and len(first) == 12
    finally:
        _launch.KERNELS.remove(k)
