"""Every committed benchmark results file has the one shared shape (benchmarks/_results.py): a list of flat
records, each with device and date, the same keys in every record of a file; and the writer keeps it."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _results import conform, load_records, problems, write_results  # noqa: E402

FILES = sorted([*BENCH.glob("results/*.json"), *BENCH.glob("probes/results/*.json"),
                *BENCH.glob("validation/engine_runs/*.json")])


def test_there_are_results_files():
    assert len(list(BENCH.glob("results/*.json"))) >= 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(BENCH)))
def test_results_file_is_flat_with_one_key_set(path):
    assert problems(json.loads(path.read_text())) == []


def test_writer_pads_flattens_and_reads_back(tmp_path):
    recs = [{"device": "d", "date": "x", "ms": 1.5, "probe_gbps": {"16KiB": 0.9}},
            {"device": "d", "date": "x", "ms": 2, "note": "n"}]
    written = write_results(tmp_path / "r.json", recs)
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows == written and problems(rows) == []
    assert rows[1] == {"device": "d", "date": "x", "ms": 2, "probe_gbps.16KiB": None, "note": "n"}
    assert load_records(tmp_path / "r.json") == recs


@pytest.mark.parametrize("bad, what", [([{"date": "x", "ms": 1}], "no 'device'"),
                                       ([{"device": "d", "date": "x", "ms": [1, 2]}], "not a scalar")])
def test_writer_names_a_bad_record(bad, what):
    with pytest.raises(ValueError, match=what):
        conform(bad)


def test_a_file_with_differing_keys_is_named():
    assert any("keys differ" in p for p in problems([{"device": "d", "date": "x", "a": 1},
                                                     {"device": "d", "date": "x"}]))
