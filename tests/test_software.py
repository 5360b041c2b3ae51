"""sim.software: engine constants fitted on one machine, applied to another machine's measured hardware."""

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from experiments.setup import build_run
from sim.errors import ConfigError
from sim.hardware import HardwareProfile
from sim.presets import CONF_DIR, preset_names
from sim.software import SoftwareProfile


def test_none_changes_nothing():
    hw = HardwareProfile.preset("h100-calibrated")
    assert SoftwareProfile.preset("none").apply(hw) is hw


def test_software_replaces_overheads_and_scales_rates():
    hw = HardwareProfile.preset("h100-calibrated")
    sw = SoftwareProfile(name="t", op_overhead_us=1.5, io_overhead_us=7.0, row_op_us=0.01, overlap=False,
                         compute_efficiency=0.1, read_efficiency=0.5, source="test")
    got = sw.apply(hw)
    assert (got.op_overhead_us, got.io_overhead_us, got.row_op_us, got.overlap) == (1.5, 7.0, 0.01, False)
    assert got.compute_gbps == pytest.approx(hw.compute_gbps * 0.1)
    np.testing.assert_allclose(got.read_gbps, np.asarray(hw.read_gbps) * 0.5)
    # hardware constants stay the machine's own
    assert (got.mem_gbps, got.h2d_gbps, got.seq_gbps, got.read_latency_us) == \
        (hw.mem_gbps, hw.h2d_gbps, hw.seq_gbps, hw.read_latency_us)
    assert got.name == "h100-calibrated+t" and "software constants from t" in got.sources["op_overhead_us"]


def test_read_efficiency_skips_a_table_read_through_the_loader():
    """read_efficiency is the loader's rate over the Python-thread probe's: a table the loader itself measured
    (real.calibrate --reader loader) already is the loader's rate, and scaling it again would count it twice."""
    hw = HardwareProfile.preset("h100-calibrated").with_changes(read_probe="loader")
    sw = SoftwareProfile(name="t", read_efficiency=1.5, compute_efficiency=0.5)
    got = sw.apply(hw)
    np.testing.assert_allclose(got.read_gbps, hw.read_gbps)
    assert "read_efficiency" not in got.sources["read_gbps"] and got.compute_gbps == pytest.approx(hw.compute_gbps / 2)
    with pytest.raises(ConfigError, match="hardware.read_probe"):
        hw.with_changes(read_probe="fio")


def test_null_fields_keep_the_hardware_profiles_own():
    hw = HardwareProfile.preset("h100-calibrated")
    got = SoftwareProfile(name="t", io_overhead_us=3.0).apply(hw)
    assert got.io_overhead_us == 3.0 and got.op_overhead_us == hw.op_overhead_us and got.row_op_us == hw.row_op_us


@pytest.mark.parametrize("name", preset_names("software"))
def test_every_software_preset_loads_and_says_where_it_comes_from(name):
    sw = SoftwareProfile.preset(name)
    assert sw.is_none or (sw.source and sw.fit_device and set(sw.sources) >= {"op_overhead_us", "io_overhead_us",
                                                                              "row_op_us", "compute_efficiency"})


def test_bad_software_values_name_the_field():
    with pytest.raises(ConfigError, match="software.compute_efficiency"):
        SoftwareProfile(compute_efficiency=0.0)
    with pytest.raises(ConfigError, match="software.bogus"):
        SoftwareProfile.from_dict({"bogus": 1})


def test_hydra_composes_hardware_with_software():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["hardware=h100-calibrated", "software=engine-h100"])
    setup = build_run(cfg)
    sw = SoftwareProfile.preset("engine-h100")
    assert setup.hardware.name == "h100-calibrated+engine-h100"
    assert setup.hardware.op_overhead_us == sw.op_overhead_us
    assert setup.hardware.compute_gbps == pytest.approx(HardwareProfile.preset("h100-calibrated").compute_gbps
                                                        * sw.compute_efficiency)
