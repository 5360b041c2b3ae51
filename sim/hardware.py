"""HardwareProfile: flash, memory and compute of one machine, as the simulator needs them.

Flash random-read throughput is a table over read size and reads in flight (measured by
``python -m real.calibrate`` or taken from a paper); the simulator interpolates it in log-log
space, so "how fast is a 24 KiB read at depth 12" always has an answer that is monotone in both."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.atomic import atomic_write_text
from sim.errors import reject_unknown, require
from sim.presets import load_preset

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    read_kib: list[float]             # table rows: read sizes (KiB), ascending
    depths: list[int]                 # table columns: reads in flight, ascending
    read_gbps: list[list[float]]      # [size][depth] aggregate random-read throughput (GB/s)
    read_latency_us: float            # one 4 KiB read alone
    seq_gbps: float                   # large sequential reads
    mem_gbps: float                   # memory copy bandwidth where the neuron cache lives
    compute_gbps: float               # effective weight-streaming rate of a decode matvec
    compute_tflops: float = 10.0      # arithmetic ceiling (matters for batch > 1)
    h2d_gbps: float = 0.0             # host-to-device copy; 0 = the cache is in host memory (CPU)
    memory_gib: float = 16.0          # memory available for weights
    op_overhead_us: float = 5.0       # fixed cost of one compute op (launch / dispatch)
    io_overhead_us: float = 20.0      # fixed cost of one batch of reads (submit, wait, wake-up)
    row_op_us: float = 0.05           # bookkeeping per neuron the memory manager touches
    overlap: bool = True              # I/O runs while compute over resident neurons proceeds
    # what read the flash table: "loader" (real.calibrate through the engine's own reader: a software profile's
    # read_efficiency, a loader/probe ratio, does not apply) or "threads" (the raw probe, a spec or a paper)
    read_probe: str = "threads"
    source: str = ""                  # where the numbers come from (paper, DESIGN.md, calibrate run)
    # per constant (field name -> a spec sheet / public benchmark, a real.calibrate run with device and date,
    # or a fit with the data it was fitted to); the flash table's three fields may share the key "read_gbps"
    sources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(len(self.read_kib) >= 1 and list(self.read_kib) == sorted(self.read_kib), "hardware.read_kib",
                "must be a non-empty ascending list of read sizes in KiB", "sort the table rows by size")
        require(len(self.depths) >= 1 and list(self.depths) == sorted(self.depths) and min(self.depths) >= 1,
                "hardware.depths", "must be a non-empty ascending list of reads in flight >= 1",
                "e.g. depths: [1, 4, 16, 64]")
        table = np.asarray(self.read_gbps, dtype=float)
        require(table.shape == (len(self.read_kib), len(self.depths)), "hardware.read_gbps",
                f"shape {table.shape} does not match {len(self.read_kib)} sizes x {len(self.depths)} depths",
                "give one row per read size and one column per depth")
        require(bool(np.all(table > 0)), "hardware.read_gbps", "every throughput must be > 0",
                "re-run python -m real.calibrate")
        for f in ("read_latency_us", "seq_gbps", "mem_gbps", "compute_gbps", "compute_tflops", "memory_gib"):
            v = getattr(self, f)
            require(isinstance(v, (int, float)) and v > 0, f"hardware.{f}", f"must be > 0, got {v!r}",
                    f"set hardware.{f} to a measured value")
        require(isinstance(self.sources, dict) and all(isinstance(v, str) and v.strip() for v in self.sources.values()),
                "hardware.sources", "must map constant names to non-empty source texts",
                "e.g. sources: {mem_gbps: 'Apple M1 Max spec sheet: 400 GB/s'}")
        stray = sorted(set(self.sources) - set(CONSTANTS))
        require(not stray, f"hardware.sources.{stray[0] if stray else ''}", "is not a constant of the profile",
                f"use only {list(CONSTANTS)}")
        require(self.read_probe in ("threads", "loader"), "hardware.read_probe",
                f"must be 'threads' or 'loader', got {self.read_probe!r}",
                "set read_probe: loader for a table real.calibrate measured through the engine's loader, else threads")
        for f in ("h2d_gbps", "op_overhead_us", "io_overhead_us", "row_op_us"):
            v = getattr(self, f)
            require(isinstance(v, (int, float)) and v >= 0, f"hardware.{f}", f"must be >= 0, got {v!r}",
                    f"set hardware.{f} to a measured value (0 disables it)")

    def missing_sources(self) -> list[str]:
        """Constants without a source line (the flash table's fields count as one, ``read_gbps``)."""
        return [c for c in CONSTANTS if c not in ("read_kib", "depths") and c not in self.sources]

    def with_software(self, sw: "SoftwareProfile") -> "HardwareProfile":
        """This machine's hardware constants with the engine's software constants (per-op overheads,
        efficiencies: sim.software) in place of its own: how a profile fitted on one machine's engine runs
        carries to another machine that only has a quick calibration."""
        return sw.apply(self)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "HardwareProfile":
        return cls.from_dict(load_preset("hardware", name))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HardwareProfile":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareProfile":
        data = {k: v for k, v in data.items() if not k.startswith("_") and k != "defaults"}
        reject_unknown(cls, data, "hardware", "HardwareProfile field")
        data["read_kib"] = [float(x) for x in data.get("read_kib", [])]
        data["depths"] = [int(x) for x in data.get("depths", [])]
        data["read_gbps"] = [[float(x) for x in row] for row in data.get("read_gbps", [])]
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path, header: str = "") -> None:
        """Write atomically, after checking that the text loads back as this profile."""
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False)
        HardwareProfile.from_dict(yaml.safe_load(text))
        atomic_write_text(path, text)

    def with_changes(self, **changes: Any) -> "HardwareProfile":
        d = self.to_dict()
        d.update(changes)
        return HardwareProfile.from_dict(d)

    # ---- flash model ---------------------------------------------------------------------
    @cached_property
    def _log_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.log2(np.asarray(self.read_kib)), np.log2(np.asarray(self.depths, dtype=float)),
                np.log2(np.asarray(self.read_gbps, dtype=float)))

    def read_throughput_gbps(self, size_bytes: np.ndarray | float, depth: np.ndarray | float) -> np.ndarray:
        """Aggregate throughput (GB/s) of reads of ``size_bytes`` with ``depth`` of them in flight.

        Bilinear in (log size, log depth), clamped to the table's edges: beyond the largest
        measured size or depth, throughput stays at the edge value."""
        ls, ld, lt = self._log_table
        s = np.clip(np.log2(np.maximum(np.asarray(size_bytes, dtype=float), 1.0) / 1024.0), ls[0], ls[-1])
        d = np.clip(np.log2(np.maximum(np.asarray(depth, dtype=float), 1.0)), ld[0], ld[-1])
        s, d = np.broadcast_arrays(s, d)
        i = np.clip(np.searchsorted(ls, s, side="right") - 1, 0, max(len(ls) - 2, 0))
        j = np.clip(np.searchsorted(ld, d, side="right") - 1, 0, max(len(ld) - 2, 0))
        if len(ls) == 1:
            ws = np.zeros_like(s); i1 = i
        else:
            ws = (s - ls[i]) / (ls[i + 1] - ls[i]); i1 = i + 1
        if len(ld) == 1:
            wd = np.zeros_like(d); j1 = j
        else:
            wd = (d - ld[j]) / (ld[j + 1] - ld[j]); j1 = j + 1
        v = ((1 - ws) * (1 - wd) * lt[i, j] + ws * (1 - wd) * lt[i1, j] + (1 - ws) * wd * lt[i, j1]
             + ws * wd * lt[i1, j1])
        return np.exp2(v)

    def read_batch_seconds(self, sizes: np.ndarray, depth: int) -> float:
        """Time to complete a batch of reads with up to ``depth`` in flight.

        With q reads always in flight the device delivers T(s, q) in aggregate, so each read
        occupies s / T(s, q) of the batch; a batch smaller than ``depth`` runs at its own size."""
        sizes = np.asarray(sizes, dtype=float)
        if sizes.size == 0:
            return 0.0
        q = min(int(depth), int(sizes.size))
        return float(np.sum(sizes / (self.read_throughput_gbps(sizes, q) * GB))) + self.io_overhead_us * 1e-6

    def best_read_gbps(self, size_bytes: float) -> float:
        """Best throughput over the measured depths at this size (the probe's figure)."""
        return float(np.max(self.read_throughput_gbps(np.full(len(self.depths), size_bytes), self.depths)))


# every timing constant of a profile (what ``sources`` must cover); name/source/sources are not constants
CONSTANTS = tuple(f.name for f in fields(HardwareProfile) if f.name not in ("name", "source", "sources", "read_probe"))

from sim.software import SoftwareProfile  # noqa: E402  (sim.software imports nothing of this module at load)
