"""bench_fidelity's CPU parts: the read-efficiency fit and the one-record-per-machine results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fidelity as bf  # noqa: E402

POINTS = ROOT / "benchmarks" / "validation" / "fidelity" / "points-h100.json"


def test_device_slug():
    assert bf.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bf.device_slug("NVIDIA H200") == "h200"
    assert bf.device_slug("cpu") == "cpu"


def test_fit_read_is_the_median_probe_ratio(tmp_path):
    sw = tmp_path / "sw.yaml"
    data = yaml.safe_load((ROOT / "conf" / "software" / "engine-h100.yaml").read_text())
    sw.write_text(yaml.safe_dump({**data, "read_efficiency": 1.0}))
    assert bf.main(["fit-read", str(POINTS), "--software", str(sw)]) == 0
    got = yaml.safe_load(sw.read_text())
    # the loader outran the quick calibration's probe on the H100 (docs/fidelity.md); a ratio, not a constant
    assert 1.0 < got["read_efficiency"] < 1.4
    assert "points-h100.json" in got["sources"]["read_efficiency"]
    assert got["op_overhead_us"] == data["op_overhead_us"]       # the other constants are untouched


def test_fit_read_refuses_a_loader_read_table(tmp_path, monkeypatch):
    """A table read through the loader has no loader/probe ratio to fit; fitting one would be applied elsewhere."""
    sw = tmp_path / "sw.yaml"
    sw.write_text((ROOT / "conf" / "software" / "engine-h100.yaml").read_text())
    loader_hw = bf.load_hardware("h100-quick").with_changes(read_probe="loader")
    monkeypatch.setattr(bf, "load_hardware", lambda name: loader_hw)
    with pytest.raises(SystemExit, match="read through the engine's loader"):
        bf.main(["fit-read", str(POINTS), "--software", str(sw)])
    assert sw.read_text() == (ROOT / "conf" / "software" / "engine-h100.yaml").read_text()   # nothing written


def test_results_keep_one_record_per_machine(tmp_path):
    records = json.loads(POINTS.read_text())[:3]
    hw = bf.SoftwareProfile.preset("engine-h100").apply(bf.load_hardware("h100-quick"))
    bf.write_report(records, hw, tmp_path, [])
    other = [{**r, "device": "NVIDIA H200"} for r in records]
    bf.write_report(other, hw, tmp_path, [])
    bf.write_report(other, hw, tmp_path, [])                     # a rerun replaces that machine's row
    res = json.loads((tmp_path / "results" / "fidelity.json").read_text())
    assert sorted(r["predict_device"] for r in res) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert (tmp_path / "validation" / "fidelity" / "points-h200.json").exists()
    assert "NVIDIA H200" in (tmp_path / "results" / "fidelity.md").read_text()


def test_a_named_run_on_the_same_kind_adds_a_row(tmp_path):
    """A second H100 VM (its own disk) is a held-out run: it must not replace the in-sample H100 row."""
    records = json.loads(POINTS.read_text())[:3]
    hw = bf.SoftwareProfile.preset("engine-h100").apply(bf.load_hardware("h100-quick"))
    bf.write_report(records, hw, tmp_path, [])
    bf.write_report([{**r, "run": "h100-heldout"} for r in records], hw, tmp_path, [])
    res = {r["run"]: r for r in json.loads((tmp_path / "results" / "fidelity.json").read_text())}
    assert sorted(res) == ["h100", "h100-heldout"]
    assert res["h100"]["read_efficiency_in_sample"] and not res["h100-heldout"]["read_efficiency_in_sample"]
    assert (tmp_path / "results" / "fidelity-h100-heldout.md").exists()


def test_merge_adds_a_summary_without_points_and_says_which_reader(tmp_path, monkeypatch):
    """A device run whose points file did not come back still lands as a row; a table read through the loader
    is marked so, with no loader/probe ratio applied, also in a summary written before the mark existed."""
    records = json.loads(POINTS.read_text())[:3]
    hw = bf.SoftwareProfile.preset("engine-h100").apply(bf.load_hardware("h100-quick"))
    bf.write_report(records, hw, tmp_path, [])
    prof = tmp_path / "loader-quick.yaml"
    bf.load_hardware("h100-quick").with_changes(name="loader-quick", read_probe="loader").to_yaml(prof)
    monkeypatch.setattr(bf, "load_hardware", lambda name: bf.HardwareProfile.from_yaml(prof)
                        if name == "loader-quick" else bf.HardwareProfile.preset(name))
    old = {**json.loads((tmp_path / "results" / "fidelity.json").read_text())[0], "run": "vm2",
           "hardware": "loader-quick"}
    old.pop("read_probe")
    (tmp_path / "dev.json").write_text(json.dumps([old]))
    assert bf.main(["merge", str(tmp_path / "dev.json"), "--out-dir", str(tmp_path)]) == 0
    res = {r["run"]: r for r in json.loads((tmp_path / "results" / "fidelity.json").read_text())}
    assert sorted(res) == ["h100", "vm2"]
    assert res["vm2"]["read_probe"] == "loader" and res["vm2"]["read_efficiency"] == 1.0
    assert res["h100"]["read_probe"] == "threads" and res["h100"]["read_efficiency"] > 1.0
    assert "loader-read table" in (tmp_path / "results" / "fidelity.md").read_text()


def test_prepare_writes_every_points_flash_files_and_reuses_them(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(bf, "SMOKE_MODEL", None)
    assert bf.main(["prepare", "--flash-dir", str(tmp_path), "--smoke", "opt-tiny"]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["opt-tiny-bundled-float16-s0", "opt-tiny-unbundled-float16-s0"]   # the points need both layouts
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert bf.main(["prepare", "--flash-dir", str(tmp_path), "--smoke", "opt-tiny"]) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}   # reused, not rewritten
