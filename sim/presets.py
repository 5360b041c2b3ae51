"""Presets live once, as YAML in ``conf/<group>/<name>.yaml`` (the Hydra config groups).

Python code that wants a preset (tests, benchmarks, the real backend) reads the same files, so
there is no second source of defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from sim.errors import ConfigError

CONF_DIR = Path(os.environ.get("FLASHLAB_CONF", Path(__file__).resolve().parents[1] / "conf"))


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_preset(group: str, name: str) -> dict[str, Any]:
    """The preset's fields as a plain dict (Hydra's ``defaults``/``_target_`` keys dropped)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(group, f"no preset named '{name}'",
                          f"use one of {preset_names(group)} or add {path}")
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if not k.startswith("_") and k != "defaults"}
