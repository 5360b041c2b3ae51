"""Register the dataclasses' defaults with Hydra, so YAML presets list only what differs.

The dataclasses in sim/ are the one source of defaults; ``conf/policy/*.yaml`` starts from
``policy/_defaults`` and ``conf/trace/synthetic.yaml`` from ``trace/_synthetic_defaults``, so every
field can be overridden on the command line (``policy.mem_strategy=concat``) without a ``+``."""

from __future__ import annotations

from dataclasses import asdict

from hydra.core.config_store import ConfigStore

from sim.policy import Policy
from sim.trace import SyntheticTraceConfig


def register_defaults() -> None:
    cs = ConfigStore.instance()
    cs.store(group="policy", name="_defaults", node=asdict(Policy()))
    knobs = {k: v for k, v in asdict(SyntheticTraceConfig()).items() if k not in ("tokens", "seed")}
    cs.store(group="trace", name="_synthetic_defaults", node={"kind": "synthetic", **knobs})


register_defaults()
