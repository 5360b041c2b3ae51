"""A flash random-read table from a spec sheet's three numbers, for machines nobody here can measure.

``real.calibrate`` measures T(size, depth) on a machine we hold. For a machine we only read about
(the paper's M1 Max, its RTX 4090 box), spec sheets and public reviews give three numbers: the
sequential read rate, the 4 KiB random-read IOPS with one read in flight (QD1) and the peak 4 KiB
random-read IOPS with many in flight. ``FlashSpec`` turns them into the table the simulator needs:

    t(s)    = a + s / seq                        one read of s bytes alone; the access time
                                                 a = 1/iops_qd1 - 4 KiB/seq, so t(4 KiB) = 1/iops_qd1
    T(s, q) = min(seq, q * s / t(s), iops_peak * s)

q reads in flight overlap fully (Little's law) until the device's transfer rate (``seq``) or its
command rate (``iops_peak``) binds. T is monotone non-decreasing in s and in q, equals the QD1 IOPS
x 4 KiB at (4 KiB, 1) and reaches ``seq`` for large reads with enough in flight.

What the model leaves out, on purpose (no spec sheet gives it): host software cost per read beyond
the QD1 figure (a loader's thread hand-offs: ``io_overhead_us`` covers one per batch), the drop of
NAND parallelism for reads that span few dies, and the 8-32 KiB reads that some drives serve at a
lower rate than their 4 KiB IOPS suggests. A measured table (``real.calibrate``) replaces all of it.

    python -m sim.hardware_spec --seq-gbps 7.0 --qd1-iops 22000 --peak-iops 1000000    prints the table
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import yaml

from sim.errors import require

KIB = 1024
READ_KIB = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)   # real.calibrate's sizes
DEPTHS = (1, 2, 4, 8, 16, 32, 64)                                  # and reads in flight


@dataclass(frozen=True)
class FlashSpec:
    seq_gbps: float      # large sequential reads (GB/s)
    qd1_iops: float      # 4 KiB random reads, one in flight
    peak_iops: float     # 4 KiB random reads, many in flight (the drive's command rate)

    def __post_init__(self) -> None:
        for f in ("seq_gbps", "qd1_iops", "peak_iops"):
            v = getattr(self, f)
            require(isinstance(v, (int, float)) and v > 0, f"flash_spec.{f}", f"must be > 0, got {v!r}",
                    "take it from the drive's spec sheet or a public review")
        require(self.peak_iops >= self.qd1_iops, "flash_spec.peak_iops",
                f"{self.peak_iops:g} is below the QD1 figure {self.qd1_iops:g}",
                "peak IOPS (many reads in flight) is at least the one-read-at-a-time IOPS")
        require(self.access_us > 0, "flash_spec.qd1_iops",
                f"{self.qd1_iops:g} IOPS at QD1 is faster than the sequential rate allows for 4 KiB reads",
                "check the units (IOPS, GB/s)")

    @property
    def latency_us(self) -> float:
        """One 4 KiB read alone (the profile's ``read_latency_us``)."""
        return 1e6 / self.qd1_iops

    @property
    def access_us(self) -> float:
        """The part of one read's time that does not scale with its size."""
        return self.latency_us - 4 * KIB / (self.seq_gbps * 1e9) * 1e6

    def throughput_gbps(self, size_bytes: np.ndarray | float, depth: np.ndarray | float) -> np.ndarray:
        s = np.asarray(size_bytes, dtype=float)
        q = np.asarray(depth, dtype=float)
        one = self.access_us * 1e-6 + s / (self.seq_gbps * 1e9)          # seconds per read alone
        return np.minimum.reduce(np.broadcast_arrays(np.full_like(s * q, self.seq_gbps),
                                                     q * s / one / 1e9, self.peak_iops * s / 1e9))

    def table(self, read_kib: Sequence[float] = READ_KIB, depths: Sequence[int] = DEPTHS) -> list[list[float]]:
        """read_gbps[size][depth] rounded to 4 digits, as a profile YAML holds it."""
        s = np.asarray(read_kib, dtype=float)[:, None] * KIB
        q = np.asarray(depths, dtype=float)[None, :]
        return [[round(float(v), 4) for v in row] for row in self.throughput_gbps(s, q)]

    def profile_fields(self, read_kib: Sequence[float] = READ_KIB, depths: Sequence[int] = DEPTHS) -> dict[str, Any]:
        """The HardwareProfile fields this spec decides (flash table, QD1 latency, sequential rate)."""
        return {"read_kib": [float(k) for k in read_kib], "depths": [int(d) for d in depths],
                "read_gbps": self.table(read_kib, depths), "read_latency_us": round(self.latency_us, 2),
                "seq_gbps": self.seq_gbps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FlashSpec":
        known = {k: data[k] for k in ("seq_gbps", "qd1_iops", "peak_iops") if k in data}
        require(len(known) == 3, "flash_spec", f"needs seq_gbps, qd1_iops and peak_iops, got {sorted(data)}",
                "e.g. _flash_spec: {seq_gbps: 7.0, qd1_iops: 22000, peak_iops: 1000000}")
        return cls(**known)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def check_profile(data: dict[str, Any]) -> list[str]:
    """For a profile YAML (as a dict) that carries ``_flash_spec``: the fields that differ from what
    the spec derives (empty when the table, latency and sequential rate are the spec's)."""
    spec = FlashSpec.from_dict(data["_flash_spec"])
    want = spec.profile_fields(data["read_kib"], data["depths"])
    bad = []
    for k, v in want.items():
        got = data.get(k)
        if k == "read_gbps":
            ok = np.allclose(np.asarray(got, dtype=float), np.asarray(v), rtol=1e-3, atol=1e-4)
        elif k in ("read_kib", "depths"):
            ok = [float(x) for x in got] == [float(x) for x in v]
        else:
            ok = got is not None and abs(float(got) - float(v)) <= 1e-2 * max(1.0, abs(float(v)))
        if not ok:
            bad.append(k)
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.hardware_spec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-gbps", type=float, required=True)
    ap.add_argument("--qd1-iops", type=float, required=True)
    ap.add_argument("--peak-iops", type=float, required=True)
    args = ap.parse_args(argv)
    spec = FlashSpec(args.seq_gbps, args.qd1_iops, args.peak_iops)
    print(yaml.safe_dump({"_flash_spec": spec.to_dict(), **spec.profile_fields()}, sort_keys=False,
                         default_flow_style=None), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
