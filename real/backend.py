"""``backend=real`` for ``experiments.run``: execute the policy engine's plans on this machine and
return the same summary as the simulator (``sim.simulator.SimResult.summary``).

Options (conf/backend/real.yaml): ``mode`` trace|model, ``cache_dir``, ``device``, ``threads``,
``direct``, ``kernel``, ``check_cache``. Warm-up tokens (``warmup``) are executed (they fill the
neuron cache) and excluded from the per-token means; ``real_tokens.csv`` in the run directory holds
every token, warm-up included."""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from real.engine import LOADERS, FlashFFN, OPTFlashModel, SyntheticBody, TraceEngine, resolve_device
from real.flash_cache import build_opt, flash_dir_for, is_small_opt
from sim.errors import ConfigError, require
from sim.plan import LayerPlan, ffn_cache_neurons, predictor_rank
from sim.simulator import SimResult, TokenCost

log = logging.getLogger("flashlab")
MODES = ("trace", "model")


@dataclass(frozen=True)
class RealOptions:
    name: str = "real"
    mode: str = "trace"
    cache_dir: str = "cache/flash"
    device: str = "auto"
    threads: int = 0
    direct: bool = True
    kernel: str = "auto"
    loader: str = "auto"
    check_cache: bool = False
    granularity: str = "batch"     # read by the sim side of backend=both

    def __post_init__(self) -> None:
        require(self.mode in MODES, "backend.mode", f"unknown mode {self.mode!r}", f"use one of {MODES}")
        require(self.device in ("auto", "cpu", "cuda"), "backend.device", f"unknown device {self.device!r}",
                "use auto, cpu or cuda")
        require(isinstance(self.threads, int) and self.threads >= 0, "backend.threads",
                f"must be an integer >= 0, got {self.threads!r}", "0 = policy.reads_in_flight")
        require(self.loader in LOADERS, "backend.loader", f"unknown loader {self.loader!r}",
                f"use one of {LOADERS} (auto: real.loader where it imports)")
        require(self.kernel in ("auto", "torch"), "backend.kernel", f"unknown kernel {self.kernel!r}",
                "use auto or torch")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RealOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"backend.{unknown[0]}", "is not a real-backend option", f"use only {sorted(known)}")
        return cls(**data)


def _abs(path: str) -> Path:
    try:
        from hydra.utils import to_absolute_path
        return Path(to_absolute_path(path)).expanduser()
    except Exception:   # outside a Hydra app
        return Path(path).expanduser().resolve()


def write_tokens_csv(path: Path, tokens: list[TokenCost], warmup: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        names = [fl.name for fl in fields(TokenCost)]
        w.writerow(names + ["warmup"])
        for tc in tokens:
            d = asdict(tc)
            w.writerow([d[n] for n in names] + [int(tc.token < warmup)])


def run_trace(setup, plans: list[list[LayerPlan]], opts: RealOptions, progress: bool = False) -> list[TokenCost]:
    """Execute precomputed plans: FFN from the flash directory, the rest synthetic of the same geometry."""
    spec, policy = setup.spec, setup.policy
    device = resolve_device(opts.device)
    flash = flash_dir_for(spec, policy.bundling, _abs(opts.cache_dir), seed=setup.seed, progress=progress)
    body = SyntheticBody(spec, device, max_tokens=len(plans), seed=setup.seed,
                         predictor_rank=predictor_rank(spec, policy), kernel=opts.kernel)
    ffn = FlashFFN(flash, ffn_cache_neurons(spec, policy), strategy=policy.mem_strategy, device=device,
                   threads=opts.threads or policy.reads_in_flight, direct=opts.direct, kernel=opts.kernel, loader=opts.loader)
    bar = tqdm(total=len(plans), desc="real tokens", leave=False, disable=not progress)
    try:
        return TraceEngine(body, ffn, policy).run(plans, progress=bar)
    finally:
        bar.close()
        ffn.close()


def run_model(setup, opts: RealOptions, progress: bool = False) -> list[TokenCost]:
    """Run the (random-init) HF OPT model token by token with oracle plans made from its activations."""
    spec, policy = setup.spec, setup.policy
    require(is_small_opt(spec), "backend.mode", f"model mode runs small OPT presets; {spec.name} is not one",
            "use backend.mode=trace for this geometry")
    device = resolve_device(opts.device)
    flash = flash_dir_for(spec, policy.bundling, _abs(opts.cache_dir), seed=setup.seed)
    m = OPTFlashModel(build_opt(spec, setup.seed), flash, policy, device=device,
                      threads=opts.threads or policy.reads_in_flight, direct=opts.direct, kernel=opts.kernel,
                      loader=opts.loader, check_cache=opts.check_cache)
    try:
        prompt = [int(np.random.default_rng(setup.seed).integers(4, spec.vocab))]
        _, _, costs = m.generate(prompt, setup.tokens)
        return costs
    finally:
        m.close()


def measure(setup, trace, plans: list[list[LayerPlan]], run_dir: Path) -> dict[str, float]:
    """Execute ``plans`` (mode trace) or the model (mode model); per-token means after warm-up."""
    opts = RealOptions.from_dict(setup.backend)
    if opts.mode == "trace":
        tokens = run_trace(setup, plans, opts, progress=setup.progress)
    else:
        if opts.name == "both":
            log.warning("backend.mode=model makes its own plans from the model's activations; the sim row timed "
                        "the trace's plans, so error_pct compares different work (use mode=trace to compare)")
        tokens = run_model(setup, opts, progress=setup.progress)
    warm = setup.warmup if len(tokens) > setup.warmup else 0  # as SimResult.summary counts them
    log.info("real backend: %d tokens executed, the first %d (warm-up, cache filling) excluded from the means",
             len(tokens), warm)
    write_tokens_csv(Path(run_dir) / "real_tokens.csv", tokens, setup.warmup)
    return SimResult(tokens=tokens).summary(setup.warmup)
