"""Config validation: mistakes fail before any work, naming the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.setup import build_run
from sim.errors import ConfigError
from sim.hardware import HardwareProfile
from sim.model_spec import ModelSpec
from sim.policy import Policy
from sim.presets import CONF_DIR, preset_names
from sim.trace import SyntheticTraceConfig

ROOT = Path(__file__).resolve().parents[1]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("name", preset_names("model"))
def test_every_model_preset_loads(name):
    spec = ModelSpec.preset(name)
    assert spec.ffn_bytes > 0 and spec.non_ffn_bytes > 0


def test_public_geometry_of_presets():
    opt = ModelSpec.preset("opt-6.7b")
    assert (opt.n_layers, opt.d_model, opt.d_ff, opt.n_heads, opt.vocab) == (32, 4096, 16384, 32, 50272)
    assert opt.neuron_bytes == 16 * 1024  # the paper's fp16 bundle: 2 x 4096 x 2 bytes
    llama = ModelSpec.preset("llama-2-7b")
    assert (llama.d_ff, llama.ffn_matrices, llama.vocab) == (11008, 3, 32000)
    assert 6.0e9 < ModelSpec.preset("opt-6.7b").total_bytes / 2 < 7.0e9  # ~6.7B parameters


@pytest.mark.parametrize("name", preset_names("hardware"))
def test_every_hardware_preset_loads(name):
    hw = HardwareProfile.preset(name)
    assert hw.best_read_gbps(1 << 20) >= hw.best_read_gbps(4096)


@pytest.mark.parametrize("overrides, key", [
    (["policy.window=-1"], "policy.window"),
    (["policy.memory_budget=1.5"], "policy.memory_budget"),
    (["policy.memory_budget=0.1"], "policy.memory_budget"),   # cannot even hold attention + embeddings
    (["policy.chunk_kib=1"], "policy.chunk_kib"),
    (["policy.reads_in_flight=0"], "policy.reads_in_flight"),
    (["policy.mem_strategy=magic"], "policy.mem_strategy"),
    (["model.d_model=4095"], "model.n_heads"),
    (["model.activation=gelu"], "model.activation"),
    (["hardware.seq_gbps=0"], "hardware.seq_gbps"),
    (["hardware.read_gbps=[[1.0]]"], "hardware.read_gbps"),
    (["trace.sparsity=1.2"], "trace.sparsity"),
    (["trace.reuse=-0.1"], "trace.reuse"),
    (["+trace.bogus=1"], "trace.bogus"),
    (["trace=file"], "trace.path"),
    (["tokens=3", "warmup=5"], "tokens"),
    (["+policy.windw=3"], "policy.windw"),
    (["policy.predictor=magic"], "policy.predictor"),
    (["backend=both", "backend.threads=3"], "backend.threads"),
    (["policy.eviction=frequency", "policy.warm_start=true"], "trace.calibration_tokens"),  # no profile
    (["policy.warm_start=true"], "policy.warm_start"),                   # window eviction drops the preload
    (["policy.eviction=lfu", "policy.warm_start=true", "trace.calibration_tokens=64", "backend=real",
      "backend.mode=model"], "policy.warm_start"),
    (["trace.calibration_tokens=-1"], "trace.calibration_tokens"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, key):
    with pytest.raises(ConfigError) as err:
        build_run(cfg(*overrides))
    assert err.value.field == key
    assert "Fix:" in str(err.value)


def test_defaults_validate():
    setup = build_run(cfg())
    assert setup.spec.name == "opt-6.7b" and setup.policy.name == "windowing_bundling"


def test_dataclasses_validate_on_construction():
    with pytest.raises(ConfigError, match="policy.window"):
        Policy(window=-2)
    with pytest.raises(ConfigError, match="trace.cluster_size"):
        SyntheticTraceConfig(cluster_size=0)


def test_multirun_fails_before_any_run_on_a_bad_combination(tmp_path):
    """Run 2 of 2 is invalid: the sweep stops before run 1 writes anything, naming the key."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", "policy=naive,windowing", "policy.window=3,-1",
         "tokens=8", "warmup=2", "progress=false", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "policy.window" in out.stderr + out.stdout
    assert not list(tmp_path.rglob("result.json"))
