"""`python -m experiments.run -m backend=both model=opt-tiny ...` runs end to end on CPU: the tiny
model is built and converted on first use, and results.csv holds sim and real rows with error_pct."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("hydra")
pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
def test_backend_both_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.run", "-m", "backend=both", "model=opt-tiny",
           "policy=naive,windowing_bundling", "tokens=12", "warmup=2", "progress=false",  # default budget and rank
           f"backend.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    df = pd.read_csv(sweep / "results.csv")
    assert sorted(df.backend) == ["real", "real", "sim", "sim"]
    assert set(df.policy) == {"naive", "windowing_bundling"}
    assert df.error_pct.notna().all()
    real = df[df.backend == "real"].set_index("policy")
    sim = df[df.backend == "sim"].set_index("policy")
    assert (real.latency_ms > 0).all() and (real.measured_tokens == 10).all()
    # the same plans: bytes and reads per token agree exactly between the two backends
    assert (real.bytes_per_token == sim.bytes_per_token).all()
    assert (real.reads_per_token == sim.reads_per_token).all()
    assert (tmp_path / "cache" / "opt-tiny-bundled-float32-s0" / "manifest.json").exists()
    assert "warm-up" in r.stdout + r.stderr
