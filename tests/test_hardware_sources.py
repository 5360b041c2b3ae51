"""Every hardware profile says where each constant comes from (issue 26), and spec-derived flash tables
are what sim.hardware_spec derives from the spec figures they carry."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from sim.errors import ConfigError
from sim.hardware import CONSTANTS, HardwareProfile
from sim.hardware_spec import DEPTHS, KIB, READ_KIB, FlashSpec, check_profile, main
from sim.presets import CONF_DIR

PROFILES = sorted((CONF_DIR / "hardware").glob("*.yaml"))


def test_there_are_profiles_to_check():
    names = {p.stem for p in PROFILES}
    assert {"m1-max", "rtx4090-paper", "h100-calibrated"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_constant_has_a_source(path: Path):
    prof = HardwareProfile.from_yaml(path)
    assert prof.missing_sources() == [], (
        f"{path.name}: no source line for {prof.missing_sources()}; add them under `sources:` (a spec sheet or public "
        "benchmark with its name/URL, 'measured by real.calibrate ... device, date', or 'fitted ... on <data>')")
    for key, text in prof.sources.items():
        assert key in CONSTANTS
        assert len(text.strip()) >= 15, f"{path.name}: the source of {key} says too little: {text!r}"


@pytest.mark.parametrize("path", [p for p in PROFILES if "_flash_spec" in yaml.safe_load(p.read_text())],
                         ids=lambda p: p.stem)
def test_spec_derived_tables_match_their_spec(path: Path):
    assert check_profile(yaml.safe_load(path.read_text())) == []


def test_missing_sources_are_reported():
    prof = HardwareProfile.preset("m1-max")
    partial = {k: v for k, v in prof.sources.items() if k != "mem_gbps"}
    assert prof.with_changes(sources=partial).missing_sources() == ["mem_gbps"]


# ---- the spec model -------------------------------------------------------------------------------------------
SPEC = FlashSpec(seq_gbps=7.0, qd1_iops=22000, peak_iops=1_000_000)


def test_qd1_4k_point_is_the_qd1_iops():
    assert float(SPEC.throughput_gbps(4 * KIB, 1)) == pytest.approx(22000 * 4096 / 1e9, rel=1e-9)
    assert SPEC.latency_us == pytest.approx(1e6 / 22000)


def test_table_is_monotone_and_bounded():
    t = np.asarray(SPEC.table())
    assert t.shape == (len(READ_KIB), len(DEPTHS))
    assert np.all(np.diff(t, axis=0) >= -1e-9) and np.all(np.diff(t, axis=1) >= -1e-9)
    assert t.max() == pytest.approx(7.0) and t.min() > 0


def test_the_three_limits_each_bind_somewhere():
    # one read in flight: latency-bound, far below the sequential rate even at 4 MiB
    assert float(SPEC.throughput_gbps(4096 * KIB, 1)) < 7.0
    # many small reads in flight: the command rate binds (1M IOPS x 4 KiB = 4.1 GB/s)
    assert float(SPEC.throughput_gbps(4 * KIB, 64)) == pytest.approx(1e6 * 4096 / 1e9)
    # large reads with a few in flight: the transfer rate binds
    assert float(SPEC.throughput_gbps(1024 * KIB, 8)) == pytest.approx(7.0)


def test_profile_fields_load_as_a_profile():
    prof = HardwareProfile.from_dict({"name": "x", "mem_gbps": 1.0, "compute_gbps": 1.0, **SPEC.profile_fields()})
    assert prof.best_read_gbps(4 * 1024 * KIB) == pytest.approx(7.0, rel=1e-3)
    assert prof.read_latency_us == pytest.approx(45.45, abs=0.01)


@pytest.mark.parametrize("kw", [dict(seq_gbps=0, qd1_iops=1e4, peak_iops=1e5), dict(seq_gbps=5, qd1_iops=1e5, peak_iops=1e4),
                                dict(seq_gbps=0.01, qd1_iops=1e5, peak_iops=1e6)])
def test_bad_specs_are_config_errors(kw):
    with pytest.raises(ConfigError):
        FlashSpec(**kw)


def test_a_tampered_table_is_caught():
    data = yaml.safe_load((CONF_DIR / "hardware" / "m1-max.yaml").read_text())
    data["read_gbps"][3][5] *= 1.2
    assert check_profile(data) == ["read_gbps"]


def test_cli_prints_a_loadable_table(capsys):
    assert main(["--seq-gbps", "6.44", "--qd1-iops", "22000", "--peak-iops", "1000000"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert check_profile(data) == []
