"""Text every machine has: the Python standard library's own sources.

The small trained model (``real.train_small``) and the trace benchmark need real text without a
download. The standard library is on every machine with Python; its files are split into a training
and a held-out set by a stable rule (a hash of the relative path), so the held-out text is never
seen in training. The text differs a little between Python versions; the model directory records
the version it was trained on."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from sim.errors import require

# Directories that are not the library proper (tests are huge and repetitive; site-packages is not stdlib).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
             "tkinter", "turtledemo", "ensurepip", "venv", "pydoc_data"}
HELDOUT_PERCENT = 10


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train", root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library in ``split`` ("train" or "heldout")."""
    require(split in ("train", "heldout"), "split", f"unknown split {split!r}", "use 'train' or 'heldout'")
    root = root or stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        bucket = int(hashlib.sha1(str(rel.as_posix()).encode()).hexdigest(), 16) % 100
        if (bucket < HELDOUT_PERCENT) == (split == "heldout"):
            out.append(p)
    require(bool(out), "corpus", f"no standard-library .py files found under {root}",
            "run with a full CPython install (sysconfig.get_paths()['stdlib'])")
    return out


def stdlib_bytes(split: str = "train", max_bytes: int | None = None) -> bytes:
    """The split's files concatenated (each followed by a blank line), at most ``max_bytes``."""
    chunks, total = [], 0
    for p in stdlib_files(split):
        data = p.read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    return blob if max_bytes is None else blob[:max_bytes]
