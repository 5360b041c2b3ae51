"""real.calibrate: a quick run on a tiny file yields a profile the simulator and Hydra presets accept."""

import time

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import sim.presets  # noqa: E402
from real import calibrate as cal  # noqa: E402
from sim.hardware import HardwareProfile  # noqa: E402


def test_quick_calibration_writes_a_valid_profile(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    out = conf / "hardware" / "tiny-test.yaml"
    rc = cal.main([str(tmp_path / "disk"), "--quick", "--name", "tiny-test", "--out", str(out), "--file-mib", "16",
                   "--sizes-kib", "4,64,256", "--depths", "1,4", "--no-progress"])
    assert rc == 0
    prof = HardwareProfile.from_yaml(out)
    assert prof.name == "tiny-test" and prof.read_kib == [4.0, 64.0, 256.0] and prof.depths == [1, 4]
    table = np.asarray(prof.read_gbps)
    assert table.shape == (3, 2) and np.all(table > 0) and np.all(np.isfinite(table))
    assert prof.read_latency_us > 0 and prof.seq_gbps > 0 and prof.mem_gbps > 0 and prof.compute_gbps > 0
    assert prof.row_op_us > 0 and prof.op_overhead_us > 0 and prof.memory_gib > 0
    assert "real.calibrate --quick" in prof.source and "O_DIRECT" in prof.source.upper()
    assert prof.read_probe == "loader" and "ReadPool" in prof.sources["read_gbps"]   # the engine's reader by default
    assert prof.missing_sources() == []                             # every constant says which probe measured it
    assert "real.calibrate --quick" in prof.sources["mem_gbps"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not (tmp_path / "disk" / cal.TEST_FILE).exists()        # the test file is removed
    # the simulator can use it, and it loads as a preset of the hardware group (hardware=tiny-test)
    assert prof.read_batch_seconds(np.full(8, 16384), 4) > 0
    monkeypatch.setattr(sim.presets, "CONF_DIR", conf)
    assert HardwareProfile.preset("tiny-test") == prof
    assert yaml.safe_load(out.read_text())["depths"] == [1, 4]


def test_probe_counts_bytes_it_really_read(tmp_path):
    path = tmp_path / "f.bin"
    cal.make_test_file(path, 8 << 20)
    g = cal.random_read_gbps(path, 64 << 10, 2, seconds=0.05, min_reads=10)
    assert 0 < g < 1000
    assert 0 < cal.random_read_gbps(path, 64 << 10, 2, seconds=0.05, min_reads=10, staged_bytes=1 << 20) < 1000
    with pytest.raises(ValueError, match="smaller than one"):
        cal.random_read_gbps(path, 16 << 20, 1, seconds=0.01)


def test_loader_probe_reads_through_the_engines_pool(tmp_path, monkeypatch):
    """The default table reader goes through real.loader.ReadPool; it reads what it counts, and keeps reading past
    the deadline until ``min_reads`` are done."""
    from real import loader

    path = tmp_path / "f.bin"
    cal.make_test_file(path, 8 << 20)
    counted = []
    real_submit = loader.ReadPool.submit

    def submit(self, files, dest, file_idx, dst_off, offset, length, flag=None):
        counted.append(sum(length))
        assert all(o % cal.ALIGN == 0 and o + n <= (8 << 20) for o, n in zip(offset, length))
        return real_submit(self, files, dest, file_idx, dst_off, offset, length, flag)

    monkeypatch.setattr(loader.ReadPool, "submit", submit)
    g = cal.loader_read_gbps(path, 64 << 10, 4, seconds=0.0, min_reads=1000, batch_bytes=1 << 20)
    assert 0 < g < 1000 and sum(counted) >= 1000 * (64 << 10)
    with pytest.raises(ValueError, match="smaller than one"):
        cal.loader_read_gbps(path, 16 << 20, 1, seconds=0.01)
    with pytest.raises(ValueError, match="--reader threads"):
        cal.calibrate(tmp_path / "d", "x", quick=True, staged_mib=8)


def test_batch_overhead_and_row_cost_are_measured(tmp_path):
    path = tmp_path / "f.bin"
    cal.make_test_file(path, 8 << 20)
    overhead = cal.batch_overhead_us(path, reads=20)
    assert 0 <= overhead < 10_000            # a one-read hand-off costs microseconds, not milliseconds
    assert 0 < cal.row_op_us(d_ff=2048, rounds=5) < 1000


def test_batch_overhead_sees_a_slow_pool(tmp_path, monkeypatch):
    """The probe measures the pool, not a constant: 3 ms added per batch must show up."""
    from real.loader import ReadPool
    path = tmp_path / "f.bin"
    cal.make_test_file(path, 8 << 20)
    run = ReadPool.run

    def slow_run(self, *args):
        time.sleep(0.003)
        return run(self, *args)

    monkeypatch.setattr(ReadPool, "run", slow_run)
    assert cal.batch_overhead_us(path, reads=10) >= 2500
    assert 0 < cal.row_op_us(d_ff=2048, rounds=5) < 1000


def test_a_stall_in_one_pass_does_not_set_a_cell(monkeypatch, tmp_path):
    """Each cell is the median of its passes, and the passes visit the cells in alternating order: a disk stall
    during one pass's look at a cell (a third of the rate) leaves the table as the other passes saw it."""
    seen = []

    def probe(path, size, depth, seconds, min_reads=0, seed=0, staged_bytes=0):
        seen.append((size, depth))
        stalled = len(seen) == 4                      # the first pass's 4th cell: (64 KiB, 4)
        return (0.3 if stalled else 1.0) * size / 65536 * depth

    monkeypatch.setattr(cal, "random_read_gbps", probe)
    effort = cal.Effort(file_mib=1, cell_seconds=0.0, passes=3, latency_reads=1, seq_mib=1, repeats=1)
    passes = cal.read_table_passes(tmp_path / "f", [16, 64], [1, 4], effort, 0, progress=False, reader="threads")
    assert passes.shape == (3, 2, 2)
    assert seen[:4] == seen[4:8][::-1] == seen[8:]    # forward, reversed, forward
    np.testing.assert_allclose(np.median(passes, axis=0), [[0.25, 1.0], [1.0, 4.0]])
    assert passes[0, 1, 1] == pytest.approx(1.2)
    assert cal.table_spread(passes) == pytest.approx(0.0)       # one noisy cell of four: the median cell is steady
    assert cal.table_spread(passes * np.array([1.0, 1.5, 0.8])[:, None, None]) == pytest.approx(0.7)
