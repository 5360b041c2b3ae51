"""The recorder sees exactly the neurons a ReLU FFN fires: checked against a float64 re-implementation."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from real.record import (byte_tokens, ffn_up_modules, load_inputs, main, read_prompts, record,  # noqa: E402
                         tokenize)
from sim.errors import ConfigError  # noqa: E402
from sim.trace import Trace  # noqa: E402


def tiny_opt(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                 activation_function="relu", dropout=0.0, attention_dropout=0.0)
    return transformers.OPTForCausalLM(cfg).eval()


def reference_preactivations(model, ids):
    """fc1 pre-activations [tokens, layers, d_ff] of OPT, written out in float64."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size
    S = len(ids)
    ln = torch.nn.functional.layer_norm
    x = sd["model.decoder.embed_tokens.weight"][ids] + sd["model.decoder.embed_positions.weight"][
        torch.arange(S) + 2]
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    out = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        def lin(name, h):
            return h @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]
        h = ln(x, (D,), sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"])
        q, k, v = (lin(f"self_attn.{n}_proj", h).view(S, H, D // H).transpose(0, 1) for n in "qkv")
        att = torch.softmax(q @ k.transpose(1, 2) / (D // H) ** 0.5 + causal, dim=-1) @ v
        x = x + lin("self_attn.out_proj", att.transpose(0, 1).reshape(S, D))
        h = ln(x, (D,), sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"])
        pre = lin("fc1", h)
        out.append(pre)
        x = x + lin("fc2", torch.relu(pre))
    return torch.stack(out, dim=1).numpy()


def test_recorded_mask_equals_float64_relu_mask():
    model = tiny_opt()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 97, size=40), rng.integers(0, 97, size=40), rng.integers(0, 97, size=23)]
    active, inputs = record(model, seqs, save_inputs=True)
    assert active.shape == (103, 2, 256) and inputs.shape == (103, 2, 64)
    pre = np.concatenate([reference_preactivations(model, torch.from_numpy(s)) for s in seqs])
    differ = active != (pre > 0)
    # float32 and float64 may disagree on the sign only for pre-activations within rounding of 0
    assert np.all(np.abs(pre[differ]) < 1e-4)
    assert differ.mean() < 1e-3
    assert 0.2 < active.mean() < 0.8          # a random-init ReLU layer: about half fire


def test_recorded_inputs_reproduce_the_mask():
    model = tiny_opt(2)
    ids = np.random.default_rng(0).integers(0, 97, size=30)
    active, inputs = record(model, [ids], save_inputs=True)
    for l, fc1 in enumerate(ffn_up_modules(model)):
        with torch.no_grad():
            pre = fc1(torch.from_numpy(inputs[:, l])).numpy()
        assert np.array_equal(pre > 0, active[:, l])


def test_relu_llama_style_model_is_recorded_and_gelu_is_refused():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, hidden_act="relu",
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = np.random.default_rng(0).integers(0, 50, size=20)
    active, inputs = record(model, [ids], save_inputs=True)
    assert active.shape == (20, 2, 96)
    gate = model.model.layers[1].mlp.gate_proj
    with torch.no_grad():
        assert np.array_equal(gate(torch.from_numpy(inputs[:, 1])).numpy() > 0, active[:, 1])
    cfg.hidden_act = "silu"
    with pytest.raises(ConfigError, match="hidden_act"):
        ffn_up_modules(transformers.LlamaForCausalLM(cfg))


def test_byte_fallback_and_chunking():
    assert byte_tokens("A\u00e9", 256).tolist() == [65, 0xC3, 0xA9]
    assert byte_tokens(b"\xff", 100).tolist() == [55]
    seqs, kind = tokenize(["x" * 25], None, 256, seq_len=10)
    assert kind == "bytes" and [len(s) for s in seqs] == [10, 10, 5]
    seqs, _ = tokenize(["x" * 25], None, 256, seq_len=10, max_tokens=12)
    assert [len(s) for s in seqs] == [10, 2]


def test_cli_writes_trace_inputs_and_summary(tmp_path, capsys):
    model = tiny_opt()
    model.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hello flash"}) + "\n" + json.dumps("second prompt here") + "\n")
    assert read_prompts(prompts) == ["hello flash", "second prompt here"]
    out = tmp_path / "t.npz"
    assert main([str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(out), "--save-inputs",
                 "--json", str(tmp_path / "s.json")]) == 0
    tr = Trace.load(out)
    assert tr.active.shape == (11 + 18, 2, 256)
    assert tr.meta["tokenizer"] == "bytes" and tr.meta["sequences"] == [11, 18]
    assert load_inputs(out).shape == (29, 2, 64)
    s = json.loads((tmp_path / "s.json").read_text())
    assert len(s["sparsity"]) == 2 and len(s["new_curve"]) == 8
    assert "new neurons / token" in capsys.readouterr().out


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        main([str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "t.npz")])
