"""One shape for every ``benchmarks/results/<name>.json``: a list of flat records (values str, int, float,
bool or None), each with ``device`` and ``date``, all records of a file with the same keys (None where a record
did not measure one). Torch-free; every benchmark writes through ``write_results`` (or ``write_outputs``).

    from _results import write_results, write_outputs, load_records   # with benchmarks/ on sys.path
    write_results(path, records)                     # pads, flattens, checks, writes atomically
    write_outputs(out_dir, name, lines, records)     # also the table: out_dir/results/<name>.txt
    load_records(path)                               # the records back as their writer passed them

A nested dict in a record is written as dotted keys (``{"probe_gbps": {"16KiB": 0.96}}`` ->
``"probe_gbps.16KiB": 0.96``); ``load_records`` regroups them and drops the padding."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.atomic import atomic_write_text  # noqa: E402

SCALARS = (str, int, float, bool, type(None))
REQUIRED = ("device", "date")


def flatten(record: Mapping, prefix: str = "") -> dict:
    """``record`` with nested dicts spelled as dotted keys; other values unchanged."""
    flat: dict = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def problems(records) -> list[str]:
    """What keeps ``records`` (as read from a results file) from the shape above; [] when it conforms."""
    if not isinstance(records, list) or not records:
        return ["not a non-empty list of records"]
    out = []
    keys = None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            out.append(f"record {i}: not an object")
            continue
        out += [f"record {i}: {k!r} is {type(v).__name__}, not a scalar" for k, v in rec.items()
                if not isinstance(v, SCALARS)]
        out += [f"record {i}: no {k!r}" for k in REQUIRED if rec.get(k) in (None, "")]
        if keys is None:
            keys = set(rec)
        elif set(rec) != keys:
            out.append(f"record {i}: keys differ from record 0's (missing {sorted(keys - set(rec))}, "
                       f"extra {sorted(set(rec) - keys)})")
    return out


def conform(records: Iterable[Mapping]) -> list[dict]:
    """Flatten each record, pad every record to the union of keys (first-seen order) with None, and check
    the result; raises ValueError naming what is wrong. Values are never changed."""
    flat = [flatten(r) for r in records]
    if not flat:
        return []            # a run that measured nothing (e.g. a check-only call) writes an empty list
    keys = list(dict.fromkeys(k for r in flat for k in r))
    padded = [{k: r.get(k) for k in keys} for r in flat]
    bad = problems(padded)
    if bad:
        raise ValueError("results records: " + "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
                         + ". Fix: give each record 'device' and 'date', and only str/int/float/bool/None values "
                         "(dicts are flattened to dotted keys; put lists in a string)")
    return padded


def write_results(path: str | Path, records: Iterable[Mapping]) -> list[dict]:
    """Write ``records`` to ``path`` (a results JSON) in the shared shape, atomically; returns what was written."""
    rows = conform(records)
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
    return rows


def write_outputs(out_dir: str | Path, name: str, lines: list[str], records: Iterable[Mapping],
                  suffix: str = ".txt", echo: bool = True) -> Path:
    """Print the table ``lines`` (unless ``echo`` is False) and write it to ``out_dir/results/<name><suffix>``,
    and ``records`` to ``out_dir/results/<name>.json`` through ``write_results``. Returns the results dir."""
    text = "\n".join(lines) + "\n"
    if echo:
        print(text)
    res = Path(out_dir) / "results"
    write_results(res / f"{name}.json", records)
    atomic_write_text(res / f"{name}{suffix}", text)
    return res


def regroup(record: Mapping) -> dict:
    """The inverse of ``flatten`` with the padding dropped: keys whose value is None are left out, dotted
    keys become nested dicts (an already nested record, as older files hold, passes through)."""
    out: dict = {}
    for key, value in record.items():
        if value is None:
            continue
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def load_records(path: str | Path) -> list[dict]:
    """The records of a results file as their writer passed them (``regroup`` of each)."""
    return [regroup(r) for r in json.loads(Path(path).read_text())]
