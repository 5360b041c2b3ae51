"""Turn a Hydra config into validated domain objects, before any work is done.

Every mistake surfaces here as a ConfigError that names the key (``policy.window: ...``) and the
fix; experiments.run and the multirun pre-check both call ``build_run``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

import experiments.schema  # noqa: F401  (registers dataclass defaults with Hydra)
from sim.errors import ConfigError, require
from sim.hardware import HardwareProfile
from sim.model_spec import ModelSpec
from sim.plan import ffn_cache_neurons
from sim.policy import Policy
from sim.software import SoftwareProfile
from sim.trace import SyntheticTraceConfig, Trace, generate_trace

BACKENDS = ("sim", "real", "both")
TOP_LEVEL = {"model", "hardware", "software", "policy", "trace", "backend", "tokens", "warmup", "seed", "timeline",
             "progress", "experiment", "hydra", "study", "figure"}


@dataclass
class RunSetup:
    spec: ModelSpec
    hardware: HardwareProfile
    policy: Policy
    trace_cfg: dict[str, Any]
    backend: dict[str, Any]
    tokens: int
    warmup: int
    seed: int
    timeline: bool
    progress: bool
    study: str = ""          # which experiment (conf/experiment/<study>.yaml) the run belongs to

    def make_trace(self) -> Trace:
        kind = self.trace_cfg["kind"]
        if kind == "synthetic":
            knobs = {k: v for k, v in self.trace_cfg.items() if k != "kind"}
            return generate_trace(self.spec, SyntheticTraceConfig.from_dict(
                {**knobs, "tokens": self.tokens, "seed": self.seed}))
        trace = Trace.load(self.trace_cfg["path"])
        trace.check_matches(self.spec)
        require(trace.tokens >= self.tokens, "tokens", f"the trace holds only {trace.tokens} tokens",
                f"set tokens<={trace.tokens} or record a longer trace")
        return trace.first(self.tokens)


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = cfg.get(key)
    require(node is not None, key, "is missing", f"choose one with {key}=<name> (see conf/{key}/)")
    return OmegaConf.to_container(node, resolve=True)


def build_run(cfg: DictConfig) -> RunSetup:
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    require(not unknown, unknown[0] if unknown else "", "is not a Flashlab option",
            f"use only {sorted(TOP_LEVEL - {'hydra'})} (or a group key like policy.window)")
    require(cfg.get("figure") is None, "figure",
            f"experiment {cfg.get('study') or ''} draws a figure from hardware tables; it is not a run",
            f"python -m experiments.figures --experiment {cfg.get('study') or 'NAME'} --out DIR")
    spec = ModelSpec.from_dict(_section(cfg, "model"))
    hardware = HardwareProfile.from_dict(_section(cfg, "hardware"))
    if cfg.get("software") is not None:
        hardware = SoftwareProfile.from_dict(_section(cfg, "software")).apply(hardware)
    policy = Policy.from_dict(_section(cfg, "policy"))
    trace_cfg = _section(cfg, "trace")
    require(trace_cfg.get("kind") in ("synthetic", "file"), "trace.kind",
            f"unknown trace kind {trace_cfg.get('kind')!r}", "use trace=synthetic or trace=file trace.path=FILE")
    if trace_cfg["kind"] == "synthetic":
        SyntheticTraceConfig.from_dict({k: v for k, v in trace_cfg.items() if k != "kind"})
    else:
        require(bool(trace_cfg.get("path")) and trace_cfg["path"] != "???", "trace.path", "is not set",
                "give trace.path=/path/to/trace.npz")
    backend = _section(cfg, "backend")
    require(backend.get("name") in BACKENDS, "backend.name", f"unknown backend {backend.get('name')!r}",
            f"use backend={'|'.join(BACKENDS)}")
    require(backend["name"] != "both" or backend.get("threads", 0) in (0, None, policy.reads_in_flight),
            "backend.threads", f"= {backend.get('threads')} would read at another depth than the simulated "
            f"policy.reads_in_flight={policy.reads_in_flight}, so error_pct would compare different runs",
            "leave backend.threads=0 and set policy.reads_in_flight instead")
    if policy.warm_start:   # before any work: a warm start needs an activation profile to start from
        require(trace_cfg["kind"] != "synthetic" or trace_cfg.get("calibration_tokens", 0) > 0,
                "trace.calibration_tokens", "is 0, so the trace has no activation profile for policy.warm_start",
                "set trace.calibration_tokens=512 (tokens counted before the measured ones) or policy.warm_start=false")
        require(backend["name"] == "sim" or backend.get("mode", "trace") != "model", "policy.warm_start",
                "needs the model's own activation profile, which backend.mode=model does not record",
                "use backend.mode=trace")
    for key in ("tokens", "warmup", "seed"):
        v = cfg.get(key)
        require(isinstance(v, int) and v >= 0, key, f"must be an integer >= 0, got {v!r}", f"e.g. {key}=10")
    require(cfg.tokens > cfg.warmup, "tokens", f"tokens={cfg.tokens} leaves nothing after warmup={cfg.warmup}",
            f"set tokens > {cfg.warmup} or lower warmup")
    ffn_cache_neurons(spec, policy)  # the memory budget must hold the always-resident weights
    return RunSetup(spec=spec, hardware=hardware, policy=policy, trace_cfg=trace_cfg, backend=backend,
                    tokens=int(cfg.tokens), warmup=int(cfg.warmup), seed=int(cfg.seed),
                    timeline=bool(cfg.get("timeline", False)), progress=bool(cfg.get("progress", True)),
                    study=str(cfg.get("study") or ""))
