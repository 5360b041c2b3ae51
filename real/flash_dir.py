"""A converted flash directory: its manifest, atomic file writes, and the checks that make a
half-written or damaged conversion fail loudly instead of feeding garbage to the engine.

Layout of a directory (written by ``real.convert``)::

    layer000.ffn.bin ...      FFN records per sim.layout.FlashLayout (bundled or one file per matrix)
    resident.safetensors      everything that stays in memory (attention, embeddings, norms, FFN biases)
    manifest.json             written last: geometry, dtype, layout, record size, sizes and sha256 per file

A directory without ``manifest.json`` is not a conversion (an interrupted run never writes it)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sim.errors import ConfigError
from sim.layout import FlashLayout
from sim.model_spec import ModelSpec

MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FORMAT = "flashlab-flash"
FORMAT_VERSION = 1
HASH_CHUNK = 8 << 20


class FlashDirError(ConfigError):
    """A flash directory is missing, incomplete or damaged. The message names the file and the fix."""


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicWriter:
    """Write ``path`` through ``path.tmp``: hash while writing, fsync, rename, fsync the directory.

    On an exception the temp file is removed, so a crash never leaves a file under the final name
    that looks complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.hash = hashlib.sha256()
        self.nbytes = 0
        self._f = None

    def __enter__(self) -> "AtomicWriter":
        self._f = open(self.tmp, "wb", buffering=0)
        return self

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self.hash.update(mv)
        while mv.nbytes:
            n = self._f.write(mv)
            mv = mv[n:]
            self.nbytes += n

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._f = self._f, None
        if exc_type is not None:
            f.close()
            self.tmp.unlink(missing_ok=True)
            return
        os.fsync(f.fileno())
        f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)


# ---- a streaming safetensors writer (so random or huge resident parts never sit in RAM whole) ----
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}
DTYPE_TO_ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    st_dtype: str                    # safetensors dtype code: "F16", "BF16", "F32", ...
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[bytes | memoryview]]   # yields the tensor's bytes, row-major

    @property
    def nbytes(self) -> int:
        n = ST_ITEMSIZE[self.st_dtype]
        for s in self.shape:
            n *= s
        return n


def write_safetensors(path: str | Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None
                      ) -> tuple[int, str]:
    """Write a .safetensors file tensor by tensor (8-byte header length, JSON header, data).

    Returns (bytes, sha256). Atomic like every other file of a flash directory."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape),
                          "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with AtomicWriter(path) as w:
        w.write(struct.pack("<Q", len(hjson)))
        w.write(hjson)
        for e in entries:
            start = w.nbytes
            for chunk in e.produce():
                w.write(chunk)
            if w.nbytes - start != e.nbytes:
                raise RuntimeError(f"{path}: tensor {e.name} produced {w.nbytes - start} bytes, "
                                   f"expected {e.nbytes}")
    return w.nbytes, w.sha256


# ---- reading a directory back ------------------------------------------------------------------
@dataclass(frozen=True)
class FlashDir:
    """An opened, checked flash directory."""

    root: Path
    manifest: dict[str, Any]
    spec: ModelSpec
    layout: FlashLayout

    @property
    def ffn_paths(self) -> list[Path]:
        """Paths indexed like ``Reads.file`` (FlashLayout.files order)."""
        return [self.root / n for n in self.layout.files]

    @property
    def resident_path(self) -> Path | None:
        return self.root / RESIDENT if self.manifest.get("resident") else None

    @property
    def ffn_tensors(self) -> list[dict[str, str]]:
        """Per layer: the checkpoint names of the FFN tensors (and biases) this directory holds."""
        return self.manifest.get("ffn_tensors", [])

    @staticmethod
    def open(root: str | Path, verify: bool = False) -> "FlashDir":
        """Read the manifest and check every file's presence and size (cheap); with ``verify``
        also re-hash every file against the manifest's sha256."""
        root = Path(root)
        fix = f"run `python -m real.convert SRC {root} --layout bundled` (or unbundled) to (re)create it"
        mpath = root / MANIFEST
        if not root.is_dir():
            raise FlashDirError(str(root), "is not a directory", fix)
        if not mpath.exists():
            partial = sorted(p.name for p in root.glob("*.tmp"))
            why = "has no manifest.json, so it is not a finished conversion"
            if partial:
                why += f" (temp files {partial[:3]} show an interrupted run)"
            raise FlashDirError(str(mpath), why, fix)
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise FlashDirError(str(mpath), f"is not valid JSON ({e})", fix) from None
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise FlashDirError(str(mpath), f"format {manifest.get('format')!r} v{manifest.get('version')!r} "
                                f"is not {FORMAT!r} v{FORMAT_VERSION}", fix)
        spec = ModelSpec.from_dict(manifest["model"])
        layout = FlashLayout(spec, bundled=manifest["layout"] == "bundled", align=int(manifest["align"]))
        if layout.record_bytes != manifest["record_bytes"]:
            raise FlashDirError(str(mpath), f"record_bytes {manifest['record_bytes']} disagrees with the "
                                f"layout's {layout.record_bytes}", fix)
        files = {f["name"]: f for f in manifest["files"]}
        missing = [n for n in layout.files if n not in files]
        if missing:
            raise FlashDirError(str(mpath), f"does not list {missing[0]}", fix)
        for name, entry in files.items():
            p = root / name
            if not p.exists():
                raise FlashDirError(str(p), "is missing", fix)
            size = p.stat().st_size
            if size != entry["bytes"]:
                raise FlashDirError(str(p), f"is truncated or altered: {size} bytes, manifest says "
                                    f"{entry['bytes']}", fix)
        d = FlashDir(root, manifest, spec, layout)
        if verify:
            d.verify()
        return d

    def verify(self, progress: bool = False) -> None:
        """Re-hash every file; raise FlashDirError naming the first one whose sha256 differs."""
        fix = f"re-run `python -m real.convert SRC {self.root} --layout {self.manifest['layout']}`"
        entries = self.manifest["files"]
        for entry in _maybe_tqdm(entries, progress, "verify"):
            p = self.root / entry["name"]
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise FlashDirError(str(p), f"checksum mismatch: sha256 {digest[:16]}... but the manifest "
                                    f"says {entry['sha256'][:16]}... (the file was changed or damaged)", fix)


def _maybe_tqdm(items: list, progress: bool, desc: str) -> Iterator:
    if not progress:
        return iter(items)
    from tqdm import tqdm
    return iter(tqdm(items, desc=desc, unit="file"))
