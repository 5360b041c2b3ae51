"""real.convert: checkpoint -> flash directory, bit-exact in both layouts, and loud on damage."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from real.convert import convert_checkpoint, convert_model, main as convert_main, write_random_flash  # noqa: E402
from real.flash_dir import MANIFEST, RESIDENT, FlashDir, FlashDirError  # noqa: E402
from real.loader import FlashLoader  # noqa: E402
from sim.errors import ConfigError  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402

LAYOUTS = ("bundled", "unbundled")


def tiny_opt(seed=0):
    """A random OPT with the opt-tiny preset's geometry."""
    spec = ModelSpec.preset("opt-tiny")
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(hidden_size=spec.d_model, ffn_dim=spec.d_ff, num_hidden_layers=spec.n_layers,
                                 num_attention_heads=spec.n_heads, vocab_size=spec.vocab,
                                 max_position_embeddings=64, word_embed_proj_dim=spec.d_model)
    model = transformers.OPTForCausalLM(cfg)
    with torch.no_grad():   # biases are zero at init: make them random so the round trip proves something
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    return model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def ffn_reference(state, layer, gated=False):
    """[d_ff, ffn_matrices * d_model]: [gate col,] up col, down row per neuron, from HF tensors."""
    if gated:
        p = f"model.layers.{layer}.mlp."
        return torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"],
                          state[p + "down_proj.weight"].t()], 1)
    p = f"model.decoder.layers.{layer}."
    return torch.cat([state[p + "fc1.weight"], state[p + "fc2.weight"].t()], 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_roundtrip_checkpoint_bit_exact(tmp_path, layout):
    model = tiny_opt()
    state = model.state_dict()
    model.save_pretrained(tmp_path / "hf")
    flash = convert_checkpoint(tmp_path / "hf", tmp_path / "flash", layout, progress=False)
    spec, preset = flash.spec, ModelSpec.preset("opt-tiny")
    assert (spec.n_layers, spec.d_model, spec.d_ff, spec.dtype) == (preset.n_layers, preset.d_model, preset.d_ff,
                                                                   "float32")
    assert flash.manifest["layout"] == layout and flash.layout.bundled == (layout == "bundled")
    rng = np.random.default_rng(1)
    with FlashLoader(flash, depth=4) as loader:
        for layer in range(spec.n_layers):
            ref = ffn_reference(state, layer)
            every = loader.load(layer, flash.layout.reads_for(layer, np.arange(spec.d_ff), 1 << 20))
            assert torch.equal(every, ref)              # every FFN weight, bit for bit
            ids = np.sort(rng.choice(spec.d_ff, 37, replace=False))
            order = rng.permutation(ids)
            rows = loader.load(layer, flash.layout.reads_for(layer, ids, 3 * 4096), order)
            assert torch.equal(rows, ref[order])
    # everything else, biases included, sits in resident.safetensors bit-exactly
    from safetensors.torch import load_file
    resident = load_file(str(tmp_path / "flash" / RESIDENT))
    ffn_names = {n for n in state if n.endswith(("fc1.weight", "fc2.weight"))}
    expected = {n for n in state if n not in ffn_names and n != "lm_head.weight"}   # lm_head is tied
    assert set(resident) == expected
    for n in expected:
        assert torch.equal(resident[n], state[n]), n
    assert flash.ffn_tensors[1]["up_bias"] == "model.decoder.layers.1.fc1.bias"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_memory_gated_model(tmp_path, layout):
    model = tiny_llama()
    state = model.state_dict()
    with pytest.warns(UserWarning, match="ReLU-fied"):
        flash = convert_model(model, tmp_path / "flash", layout)
    assert flash.spec.hf_architecture == "LlamaForCausalLM"
    assert flash.spec.ffn_matrices == 3 and flash.spec.n_kv_heads == 2
    assert flash.spec.original_activation == "silu" and flash.spec.activation == "relu"
    assert flash.layout.files_per_layer == (1 if layout == "bundled" else 3)
    with FlashLoader(flash, depth=3) as loader:
        for layer in range(2):
            rows = loader.load(layer, flash.layout.reads_for(layer, np.arange(96), 1 << 20))
            assert torch.equal(rows, ffn_reference(state, layer, gated=True))


def test_manifest_describes_files(tmp_path):
    flash = convert_model(tiny_opt(), tmp_path / "flash", "bundled")
    m = json.loads((tmp_path / "flash" / MANIFEST).read_text())
    d_model = ModelSpec.preset("opt-tiny").d_model
    assert m["record_bytes"] == 4096 and m["neuron_bytes"] == 2 * d_model * 4 and m["dtype"] == "float32"
    assert ModelSpec.from_dict(m["model"]) == flash.spec
    for f in m["files"]:
        assert os.path.getsize(tmp_path / "flash" / f["name"]) == f["bytes"] and len(f["sha256"]) == 64
    assert [f["name"] for f in m["files"] if f["role"] == "ffn"] == flash.layout.files
    assert not list((tmp_path / "flash").glob("*.tmp"))
    flash.verify()


def test_checksum_mismatch_names_file(tmp_path):
    convert_model(tiny_opt(), tmp_path / "flash", "bundled")
    victim = tmp_path / "flash" / "layer001.ffn.bin"
    with open(victim, "r+b") as f:          # same size, one byte flipped
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0xFF]))
    FlashDir.open(tmp_path / "flash")       # sizes still match: cheap open passes
    with pytest.raises(FlashDirError, match=r"layer001\.ffn\.bin.*checksum mismatch.*Fix: re-run"):
        FlashDir.open(tmp_path / "flash", verify=True)
    assert convert_main(["--verify-only", str(tmp_path / "flash")]) == 2


def test_truncated_file_names_file(tmp_path):
    convert_model(tiny_opt(), tmp_path / "flash", "unbundled")
    victim = tmp_path / "flash" / "layer000.down.bin"
    os.truncate(victim, victim.stat().st_size - 4096)
    with pytest.raises(FlashDirError, match=r"layer000\.down\.bin.*truncated.*Fix"):
        FlashDir.open(tmp_path / "flash")


def test_missing_manifest_and_interrupted_conversion(tmp_path, monkeypatch):
    with pytest.raises(FlashDirError, match=r"manifest\.json.*not a finished conversion.*python -m real.convert"):
        FlashDir.open(tmp_path)
    # a conversion that dies midway leaves no manifest (and removes an old one first)
    convert_model(tiny_opt(), tmp_path / "flash", "bundled")
    import real.convert as rc
    real_write = rc._write_layer

    def dying(dst, layout, layer, chunk):
        if layer == 1:
            raise KeyboardInterrupt
        return real_write(dst, layout, layer, chunk)
    monkeypatch.setattr(rc, "_write_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_model(tiny_opt(seed=1), tmp_path / "flash", "bundled")
    assert not (tmp_path / "flash" / MANIFEST).exists()
    with pytest.raises(FlashDirError, match="not a finished conversion"):
        FlashDir.open(tmp_path / "flash")


def test_unknown_architecture_and_pickle_only(tmp_path):
    model = tiny_opt()
    model.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model_type.*unknown architecture 'mamba'"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False)
    # wrong geometry in config.json: the shape error names the tensor
    d_ff, d_model = cfg["ffn_dim"], cfg["hidden_size"]
    cfg["model_type"], cfg["ffn_dim"] = "opt", d_ff // 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    shape_error = rf"fc1\.weight.*shape \({d_ff}, {d_model}\) is not \({d_ff // 2}, {d_model}\)"
    with pytest.raises(ConfigError, match=shape_error):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False)
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(cfg))
    (pk / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match=r"pickle"):
        convert_checkpoint(pk, tmp_path / "out2", progress=False)


def test_cli_convert_and_verify(tmp_path, capsys):
    tiny_opt().save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "flash"), "--layout", "unbundled", "--verify",
                         "--dtype", "float16", "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    d = FlashDir.open(tmp_path / "flash", verify=True)
    assert d.spec.dtype == "float16" and d.layout.record_bytes == 4096


def test_random_flash_same_weights_in_both_layouts(tmp_path):
    spec = ModelSpec.from_dict({**ModelSpec.preset("opt-tiny").to_dict(), "dtype": "float16", "d_ff": 600})
    a = write_random_flash(spec, tmp_path / "a", "bundled", seed=3, progress=False)
    b = write_random_flash(spec, tmp_path / "b", "unbundled", seed=3, progress=False)
    FlashDir.open(tmp_path / "a", verify=True)
    ids = np.arange(0, 600, 7)
    with FlashLoader(a) as la, FlashLoader(b) as lb:
        ra = la.load(1, a.layout.reads_for(1, ids, 1 << 16), ids).clone()
        rb = lb.load(1, b.layout.reads_for(1, ids, 1 << 16), ids)
    assert torch.equal(ra, rb)
    assert abs(float(ra.float().std()) - 0.02) < 0.002 and bool(torch.isfinite(ra).all())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / RESIDENT), "pt") as f:
        assert f.get_tensor("model.decoder.embed_tokens.weight").shape == (spec.vocab, spec.d_model)
