"""One error type for bad input, with the field and the fix in the message."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field and says how to fix it."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


def require(ok: bool, field: str, problem: str, fix: str) -> None:
    """Raise ConfigError(field, problem, fix) unless ``ok``."""
    if not ok:
        raise ConfigError(field, problem, fix)


def reject_unknown(cls, data: dict, prefix: str, what: str) -> None:
    """Raise ConfigError for the first key of ``data`` that is not a field of dataclass ``cls``."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"is not a {what}", f"use only {sorted(known)}")
