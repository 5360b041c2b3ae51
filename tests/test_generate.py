"""python -m real.generate: works out of the box on the committed small model (CPU), converts once into a cache
keyed by the checkpoint's content, and stops bad input with one clear error before any long work."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from real.generate import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "models" / "small-relu-opt"


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)          # real.generate sets it on the CPU


def run(args, capsys):
    rc = main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, out, err) -> str:
    """The run stopped with exactly one 'error: ... Fix: ...' line (no traceback) and generated nothing."""
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Fix:" in errors[0] and "Traceback" not in err, err
    assert "tokens/s" not in out
    return errors[0]


def test_cli_on_the_small_model_out_of_the_box(tmp_path):
    """The exact command of the README's tour, in a fresh process, on the committed model (no tokenizer files:
    the byte-level fallback; its trained predictor is picked up)."""
    cmd = [sys.executable, "-m", "real.generate", "models/small-relu-opt", "--prompt", "The", "--max-new-tokens",
           "16", "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("The")
    assert "tokens/s" in p.stdout and "MB read per token" in p.stdout and "io " in p.stdout
    assert "byte-level fallback" in p.stderr and "trained rank-32 predictor" in p.stderr
    assert "converting" in p.stderr
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_generate_converts_once_and_is_exact_with_the_oracle(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    args = [SMALL, "--prompt", "def f(x):\n    return", "--max-new-tokens", "12", "--cache-dir", tmp_path,
            "--predictor", "oracle", "--ignore-eos"]
    rc, out, err = run(args, capsys)
    assert rc == 0, err
    assert "converting" in err and "oracle" in err
    rc, out2, err2 = run(args, capsys)
    assert rc == 0 and "converting" not in err2                       # the cache is reused
    assert out2.split("\n---")[0] == out.split("\n---")[0]            # the same text
    # the oracle's text is the dense model's greedy text
    ref = AutoModelForCausalLM.from_pretrained(SMALL).eval()
    ids = list("def f(x):\n    return".encode())
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.split("\n---")[0].rstrip("\n") == bytes(ids).decode("utf-8", errors="replace")


def test_missing_directory(tmp_path, capsys):
    msg = one_error(*run([tmp_path / "nope", "--prompt", "x", "--cache-dir", tmp_path / "c"], capsys))
    assert "does not exist" in msg and "build_checkpoint" in msg
    assert not (tmp_path / "c").exists()


def test_no_config_json(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    shutil.copy(SMALL / "model.safetensors", tmp_path / "ck")
    msg = one_error(*run([tmp_path / "ck", "--prompt", "x", "--cache-dir", tmp_path / "c"], capsys))
    assert "no config.json" in msg


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    msg = one_error(*run([tmp_path / "ck", "--prompt", "x", "--cache-dir", tmp_path / "c"], capsys))
    assert "'gpt2'" in msg and "opt (OPTForCausalLM)" in msg and "llama" in msg


def test_budget_below_the_working_set(tmp_path, capsys):
    msg = one_error(*run([SMALL, "--prompt", "x", "--memory-budget", "0.1", "--cache-dir", tmp_path / "c"], capsys))
    assert msg.startswith("error: --memory-budget:") and "raise --memory-budget to at least 0.3" in msg
    assert not (tmp_path / "c").exists()                              # nothing converted


def test_tampered_flash_file_is_caught_before_generation(tmp_path, capsys, monkeypatch):
    args = [SMALL, "--prompt", "x", "--max-new-tokens", "2", "--cache-dir", tmp_path]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    (flash,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    victim = flash / "layer001.ffn.bin"
    st = victim.stat()
    with open(victim, "r+b") as f:                                    # flip one byte in place
        f.seek(12345)
        b = f.read(1)
        f.seek(12345)
        f.write(bytes([b[0] ^ 0x40]))
    msg = one_error(*run(args, capsys))
    assert "layer001.ffn.bin" in msg and "changed after conversion" in msg and "--reconvert" in msg
    # the same flip with the old mtime put back: a directory this small (< 1 GiB) is re-hashed whole on every run;
    # a large one trusts the stamp unless --verify
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "layer001.ffn.bin" in one_error(*run(args, capsys))
    import real.hf_checkpoint as hc
    monkeypatch.setattr(hc, "FULL_CHECK_BELOW", 0)                    # as if it were large
    rc, _, err = run(args, capsys)
    assert rc == 0, err                                               # the stamp check alone does not see it
    monkeypatch.setattr(hc, "FULL_CHECK_BELOW", 1 << 30)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = one_error(*run(args + ["--verify"], capsys))
    assert "layer001.ffn.bin" in msg
    rc, _, err = run(args + ["--reconvert"], capsys)                  # the fix the message names
    assert rc == 0, err


def test_predictor_of_another_model(tmp_path, capsys):
    from real.predictor import LowRankPredictor
    import numpy as np
    p = LowRankPredictor([np.zeros((64, 4), np.float32)] * 2, [np.zeros((4, 512), np.float32)] * 2,
                         [np.zeros(512, np.float32)] * 2, np.zeros(2, np.float32))
    p.save(tmp_path / "p.safetensors")
    msg = one_error(*run([SMALL, "--prompt", "x", "--predictor", tmp_path / "p.safetensors",
                          "--cache-dir", tmp_path / "c"], capsys))
    assert msg.startswith("error: --predictor:") and "real.predictor train" in msg
