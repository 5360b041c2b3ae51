"""The neuron cache executes the policy engine's plans exactly: rows hold the right neurons, the
bookkeeping equals sim.plan.LayerCacheState, and the paper's scheme never reallocates."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from real.neuron_cache import NeuronCache  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine  # noqa: E402
from sim.policy import Policy  # noqa: E402

SPEC = ModelSpec(name="t", n_layers=1, d_model=8, d_ff=96, n_heads=2, vocab=4, dtype="float32")


def neuron_rows(ids: np.ndarray) -> torch.Tensor:
    """A row that names its neuron: every entry equals the id (and the bias is -id)."""
    return torch.from_numpy(np.repeat(ids[:, None], 2 * SPEC.d_model, axis=1).astype(np.float32))


def random_active(rng, tokens: int, density: float) -> np.ndarray:
    hot = rng.random(SPEC.d_ff) < 0.3                       # some neurons fire often: reuse across tokens
    p = np.where(hot, density * 2.5, density * 0.4)
    return rng.random((tokens, SPEC.d_ff)) < p


@pytest.mark.parametrize("strategy", ["preallocated", "concat"])
@pytest.mark.parametrize("window,eviction,budget", [(0, "window", 0.5), (1, "window", 0.5), (3, "window", 0.5),
                                                    (5, "lru", 0.5), (4, "window", 0.45), (8, "lru", 0.9),
                                                    (3, "lfu", 0.6)])
def test_cache_follows_plans(strategy, window, eviction, budget):
    rng = np.random.default_rng(window * 7 + len(strategy))
    policy = Policy(window=window, eviction=eviction, memory_budget=budget, mem_strategy=strategy, predictor_rank=1)
    engine = PolicyEngine(SPEC, policy)
    cache = NeuronCache(SPEC.d_ff, engine.capacity, 2 * SPEC.d_model, torch.float32, "cpu", strategy)
    storage = cache.data.data_ptr()
    copied = 0
    for t, active in enumerate(random_active(rng, 40, 0.15)):
        plan = engine.plan_token([active])[0]
        new = neuron_rows(plan.load)
        cache.apply(plan, new, -new[:, 0])
        cache.check(engine.caches[0])
        held = cache.view()
        ids = cache.neuron_at[: cache.n_rows]
        assert np.array_equal(held[:, 0].numpy(), ids.astype(np.float32)), f"token {t}: rows hold wrong neurons"
        assert np.array_equal(cache.bias[: cache.n_rows].numpy(), -ids.astype(np.float32))
        assert np.all(cache.row_of[plan.active[np.isin(plan.active, ids)]] >= 0)
        copied += plan.rows_copied
        if strategy == "preallocated":
            assert cache.data.data_ptr() == storage, "the paper's scheme must not reallocate"
            assert cache.data.shape[0] == engine.capacity
        else:
            assert cache.data.shape[0] == cache.n_rows
    assert cache.rows_copied == copied


def test_naive_pins_the_first_neurons():
    policy = Policy.preset("naive")
    engine = PolicyEngine(SPEC, policy)
    cache = NeuronCache(SPEC.d_ff, engine.capacity, 2 * SPEC.d_model, torch.float32, "cpu")
    for t in range(3):
        plan = engine.plan_token([np.ones(SPEC.d_ff, bool)])[0]
        cache.apply(plan, neuron_rows(plan.load))
        assert np.array_equal(cache.neuron_at[: cache.n_rows], np.arange(engine.capacity))


def test_mismatched_plan_is_refused():
    policy = Policy(window=2, predictor_rank=1)
    engine = PolicyEngine(SPEC, policy)
    cache = NeuronCache(SPEC.d_ff, engine.capacity, 2 * SPEC.d_model, torch.float32, "cpu")
    a = np.zeros(SPEC.d_ff, bool)
    a[:5] = True
    plan = engine.plan_token([a])[0]
    cache.apply(plan, neuron_rows(plan.load))
    other = NeuronCache(SPEC.d_ff, engine.capacity, 2 * SPEC.d_model, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="not resident"):
        other.rows_for(plan.active)
    with pytest.raises(AssertionError):
        other.check(engine.caches[0])
