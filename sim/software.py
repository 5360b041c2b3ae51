"""SoftwareProfile: the timing constants that belong to Flashlab's engine, not to the machine.

A HardwareProfile mixes two kinds of constant. The disk table, memory and host-to-device rates, the
GPU's matvec rate are properties of the *hardware*: ``python -m real.calibrate DIR --quick`` measures
them on any machine in under a minute. The per-op and per-read-batch overheads, the bookkeeping cost
per row, and how much of the hardware's matvec rate the engine's decode step actually reaches are
properties of the *software*: they are fitted once, on engine runs of one machine
(``python benchmarks/bench_fidelity.py fit``), and carried to machines that were only calibrated.

    python -m experiments.run hardware=<quick-calibrated name> software=<fitted name> backend=both

``software=none`` (the default) keeps the hardware profile's own constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sim.atomic import atomic_write_text
from sim.errors import reject_unknown, require
from sim.presets import load_preset

if TYPE_CHECKING:
    from sim.hardware import HardwareProfile

# the software constants, each with the HardwareProfile field it sets
REPLACED = ("op_overhead_us", "io_overhead_us", "row_op_us", "overlap")
SCALED = {"compute_efficiency": "compute_gbps", "read_efficiency": "read_gbps"}


@dataclass(frozen=True)
class SoftwareProfile:
    name: str = "none"
    op_overhead_us: float | None = None     # fixed cost of one compute op as the engine issues it (launch, sync)
    io_overhead_us: float | None = None     # fixed cost of one batch of reads (submit, wait, wake-up)
    row_op_us: float | None = None          # memory-manager bookkeeping per neuron touched
    overlap: bool | None = None             # the engine overlaps reads with compute over resident neurons
    compute_efficiency: float = 1.0         # engine's effective decode rate / the hardware's measured matvec rate
    read_efficiency: float = 1.0            # engine loader's read rate / the Python-thread probe's (size, depth);
                                            # not applied to a table read through the loader (read_probe: loader)
    fit_device: str = ""                    # the machine whose engine runs these were fitted on
    source: str = ""
    sources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in ("op_overhead_us", "io_overhead_us", "row_op_us"):
            v = getattr(self, f)
            require(v is None or (isinstance(v, (int, float)) and v >= 0), f"software.{f}",
                    f"must be >= 0 (or null: keep the hardware profile's), got {v!r}",
                    f"set software.{f} to a fitted value")
        for f in SCALED:
            v = getattr(self, f)
            require(isinstance(v, (int, float)) and 0 < v <= 10, f"software.{f}",
                    f"must be a ratio in (0, 10], got {v!r}", f"set software.{f}=1.0 to keep the hardware's rate")
        require(self.overlap is None or isinstance(self.overlap, bool), "software.overlap",
                f"must be true, false or null, got {self.overlap!r}", "e.g. software.overlap=true")

    @property
    def is_none(self) -> bool:
        return self.name == "none" and all(getattr(self, f) is None for f in REPLACED) and \
            all(getattr(self, f) == 1.0 for f in SCALED)

    def apply(self, hw: "HardwareProfile") -> "HardwareProfile":
        """``hw`` with these software constants: replaced ones set, efficiencies multiplying the measured rates."""
        if self.is_none:
            return hw
        import numpy as np

        changes: dict[str, Any] = {f: getattr(self, f) for f in REPLACED if getattr(self, f) is not None}
        factors = self.factors(hw)
        changes["compute_gbps"] = hw.compute_gbps * factors["compute_efficiency"]
        changes["read_gbps"] = (np.asarray(hw.read_gbps) * factors["read_efficiency"]).tolist()
        note = f"software constants from {self.name} (fitted on {self.fit_device or 'unknown'})"
        sources = dict(hw.sources)
        for f in [*changes]:
            if f in REPLACED:
                sources[f] = f"{note}: {self.sources.get(f, self.source)}"
        for eff, target in SCALED.items():
            if factors[eff] != 1.0:
                sources[target] = f"{hw.sources.get(target, hw.source)}; x {eff} {factors[eff]:.3g} ({note})"
        return hw.with_changes(name=f"{hw.name}+{self.name}", sources=sources,
                               source=f"{hw.source} | {note}", **changes)

    def factors(self, hw: "HardwareProfile") -> dict[str, float]:
        """The efficiencies ``apply`` multiplies ``hw``'s rates by: read_efficiency is a loader/probe ratio, so a
        table the loader itself read (``hw.read_probe == "loader"``) gets none."""
        out = {eff: float(getattr(self, eff)) for eff in SCALED}
        if hw.read_probe == "loader":
            out["read_efficiency"] = 1.0
        return out

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "SoftwareProfile":
        return cls.from_dict(load_preset("software", name))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SoftwareProfile":
        data = {k: v for k, v in (data or {}).items() if not k.startswith("_") and k != "defaults"}
        reject_unknown(cls, data, "software", "SoftwareProfile field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path, header: str = "") -> None:
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False)
        SoftwareProfile.from_dict(yaml.safe_load(text))
        atomic_write_text(path, text)
