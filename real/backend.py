"""``backend=real`` for ``experiments.run``: execute the policy engine's plans on this machine and
return the same summary as the simulator (``sim.simulator.SimResult.summary``).

Options (conf/backend/real.yaml): ``mode`` trace|model, ``cache_dir``, ``device``, ``threads``,
``direct``, ``kernel``, ``check_cache``; for ``mode=model`` also ``checkpoint`` (a Hugging Face checkpoint
directory of any size: ``backend.checkpoint=DIR``; without one, small OPT presets are built at random) and
``predictor_file`` (a trained ``real.predictor`` file; ``backend.predictor_file=FILE``; default: the oracle)
and ``active`` (``backend.active=trace``: the trace's sets instead of the model's own, for timing a random-init
checkpoint whose activations are not realistic). Warm-up tokens (``warmup``) are executed (they fill the
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

from real.engine import LOADERS, FlashFFN, HFFlashModel, SyntheticBody, TraceEngine, resolve_device
from real.flash_cache import build_opt, flash_dir_for, is_small_opt, same_geometry
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
    checkpoint: str = ""           # mode=model: a Hugging Face checkpoint dir (config.json + safetensors shards)
    predictor_file: str = ""       # mode=model: a trained real.predictor file (else the oracle)
    active: str = "live"           # mode=model: live = sets from the model's activations (oracle or predictor_file);
                                   # trace = the trace's sets (policy.predictor picks predicted or true), for timing

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
        require(self.active in ("live", "trace"), "backend.active", f"unknown value {self.active!r}",
                "use live (the model's own activations) or trace (the trace's sets, for timing)")

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
    # policy.lookahead: the look-ahead predictor's work in each layer, and the next layer's early reads issued while
    # a layer runs (the overlap the simulator times)
    body = SyntheticBody(spec, device, max_tokens=len(plans), seed=setup.seed,
                         predictor_rank=predictor_rank(spec, policy), kernel=opts.kernel,
                         lookahead=bool(policy.lookahead))
    ffn = FlashFFN(flash, ffn_cache_neurons(spec, policy), strategy=policy.mem_strategy, device=device,
                   threads=opts.threads or policy.reads_in_flight, direct=opts.direct, kernel=opts.kernel, loader=opts.loader,
                   pipeline=bool(policy.lookahead))
    bar = tqdm(total=len(plans), desc="real tokens", leave=False, disable=not progress)
    try:
        return TraceEngine(body, ffn, policy).run(plans, progress=bar)
    finally:
        bar.close()
        ffn.close()


def run_model(setup, opts: RealOptions, trace=None, progress: bool = False) -> list[TokenCost]:
    """Run a Hugging Face model token by token, every FFN from flash through plans made layer by layer.

    The model: ``backend.checkpoint`` (any size; only its non-FFN weights are loaded, onto the device; its FFN
    is converted on first use into ``cache_dir``), else a random-init small OPT preset. Active sets: the oracle
    (live activations), a trained predictor (``backend.predictor_file``), or with ``policy.predictor=trace``
    with ``backend.active=trace`` the trace's sets (predicted ones if ``policy.predictor=trace``, else the true
    ones; timing only: the FFN then computes the trace's neurons, not the model's)."""
    spec, policy = setup.spec, setup.policy
    device = resolve_device(opts.device)
    active_sets = None
    if policy.sparse and opts.active == "trace":
        require(trace is not None, "backend.active", "is 'trace' but no trace was given", "use backend.active=live")
        active_sets = trace.predicted if policy.predictor == "trace" and trace.predicted is not None else trace.active
        log.warning("model mode with backend.active=trace: the FFN computes the trace's active sets, not the "
                    "model's (for timing a checkpoint without realistic sparsity); the logits are not the model's")
    predictor = None
    if opts.predictor_file:
        from real.predictor import LowRankPredictor
        predictor = LowRankPredictor.load(_abs(opts.predictor_file))
    kw = dict(device=device, threads=opts.threads or policy.reads_in_flight, direct=opts.direct, kernel=opts.kernel,
              loader=opts.loader, check_cache=opts.check_cache, predictor=predictor, active_sets=active_sets,
              timing_rank=predictor_rank(spec, policy) if active_sets is not None else 0, seed=setup.seed)
    if opts.checkpoint:
        from real.hf_checkpoint import Checkpoint, converted_flash
        ckpt = Checkpoint.open(_abs(opts.checkpoint))
        cspec = ckpt.spec(spec.dtype)
        require(same_geometry(cspec, spec), "backend.checkpoint",
                f"{ckpt.root} is {cspec.n_layers} layers x d_model {cspec.d_model} x d_ff {cspec.d_ff} (vocab "
                f"{cspec.vocab}, {cspec.ffn_matrices} FFN matrices) but model={spec.name} is {spec.n_layers} x "
                f"{spec.d_model} x {spec.d_ff} (vocab {spec.vocab}, {spec.ffn_matrices})",
                "choose the model preset this checkpoint was built from (model=NAME), so the simulator's plans and "
                "the budget are the checkpoint's")
        flash = converted_flash(ckpt, _abs(opts.cache_dir), policy.bundling, spec.dtype, progress=progress,
                                log=log.info)
        m = HFFlashModel.from_checkpoint(ckpt, flash, policy, progress=progress, **kw)
    else:
        require(is_small_opt(spec), "backend.mode",
                f"model mode without a checkpoint builds small OPT presets at random; {spec.name} is not one",
                f"give backend.checkpoint=DIR (scripts/build_checkpoint.py --model {spec.name} --out DIR builds a "
                "random-init one in the Hugging Face layout), or use backend.mode=trace")
        flash = flash_dir_for(spec, policy.bundling, _abs(opts.cache_dir), seed=setup.seed)
        m = HFFlashModel(build_opt(spec, setup.seed), flash, policy, **kw)
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
        tokens = run_model(setup, opts, trace, progress=setup.progress)
    warm = setup.warmup if len(tokens) > setup.warmup else 0  # as SimResult.summary counts them
    log.info("real backend: %d tokens executed, the first %d (warm-up, cache filling) excluded from the means",
             len(tokens), warm)
    write_tokens_csv(Path(run_dir) / "real_tokens.csv", tokens, setup.warmup)
    return SimResult(tokens=tokens).summary(setup.warmup)
