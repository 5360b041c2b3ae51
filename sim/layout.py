"""FlashLayout: where each FFN neuron lives on flash, and how a set of neurons becomes reads.

Bundled: one file per layer; record i = [gate col i,] up col i, down row i, padded to ``align``.
Unbundled: one file per matrix per layer; record i of each file is that matrix's column/row i.
Records are padded to 4 KiB multiples so that O_DIRECT reads need no bounce buffer. The
converter (``real.convert``) writes exactly this layout and the loader reads these offsets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.model_spec import ModelSpec

ALIGN = 4096


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Reads:
    """A batch of reads: parallel arrays, one entry per read.

    ``neuron_start``/``neuron_count`` say which neurons a read covers (consecutive ids), so the
    executor knows where the bytes go without re-deriving the layout."""

    file: np.ndarray          # int32 index into FlashLayout.files
    offset: np.ndarray        # int64 byte offset, ALIGN-aligned
    length: np.ndarray        # int64 bytes, ALIGN multiple
    neuron_start: np.ndarray  # int64
    neuron_count: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.file.size)

    @property
    def total_bytes(self) -> int:
        return int(self.length.sum())

    @staticmethod
    def empty() -> "Reads":
        z = np.zeros(0, dtype=np.int64)
        return Reads(np.zeros(0, dtype=np.int32), z, z, z, z)

    @staticmethod
    def concat(parts: list["Reads"]) -> "Reads":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Reads.empty()
        return Reads(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("file", "offset", "length", "neuron_start", "neuron_count")))


def neuron_runs(ids: np.ndarray, max_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted unique ids into runs of consecutive ids, each at most ``max_run`` long.

    Returns (start id, count) per run: the reads after merging adjacent neurons."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts_idx = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts_idx, [ids.size])))
    run_start = ids[starts_idx]
    # cut long runs into pieces of max_run
    pieces = -(-lengths // max_run)
    rep_start = np.repeat(run_start, pieces)
    piece_idx = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = rep_start + piece_idx * max_run
    remaining = np.repeat(lengths, pieces) - piece_idx * max_run
    return start, np.minimum(remaining, max_run)


@dataclass(frozen=True)
class FlashLayout:
    spec: ModelSpec
    bundled: bool
    align: int = ALIGN

    @property
    def matrices(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.spec.ffn_matrices == 3 else ("up", "down")

    @property
    def files_per_layer(self) -> int:
        return 1 if self.bundled else len(self.matrices)

    @property
    def record_bytes(self) -> int:
        """Bytes of one record on flash (one neuron bundled, or one matrix row unbundled)."""
        raw = self.spec.neuron_bytes if self.bundled else self.spec.d_model * self.spec.dtype_bytes
        return round_up(raw, self.align)

    @property
    def bytes_per_neuron(self) -> int:
        """Bytes read from flash to fetch one neuron, padding included."""
        return self.record_bytes * self.files_per_layer

    @property
    def files(self) -> list[str]:
        if self.bundled:
            return [f"layer{l:03d}.ffn.bin" for l in range(self.spec.n_layers)]
        return [f"layer{l:03d}.{m}.bin" for l in range(self.spec.n_layers) for m in self.matrices]

    def file_index(self, layer: int, matrix: int = 0) -> int:
        return layer * self.files_per_layer + matrix

    def file_bytes(self) -> int:
        return self.spec.d_ff * self.record_bytes

    def reads_for(self, layer: int, neurons: np.ndarray, chunk_bytes: int) -> Reads:
        """Reads fetching ``neurons`` (sorted, unique) of ``layer``, adjacent ones merged up to
        ``chunk_bytes`` per read (never less than one record)."""
        start, count = neuron_runs(neurons, max(1, chunk_bytes // self.record_bytes))
        if start.size == 0:
            return Reads.empty()
        per_file = []
        for m in range(self.files_per_layer):
            per_file.append(Reads(
                file=np.full(start.size, self.file_index(layer, m), dtype=np.int32),
                offset=start * self.record_bytes, length=count * self.record_bytes,
                neuron_start=start, neuron_count=count))
        return Reads.concat(per_file)
