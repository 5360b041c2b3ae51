"""Record activation traces from a local Hugging Face checkpoint.

    python -m real.record MODEL_DIR --prompts FILE --out TRACE.npz [--save-inputs] [--seq-len 256]

Forward hooks on each layer's FFN up projection see, for every token, the FFN input and the
pre-activation; a neuron is active when its ReLU output is exactly > 0, i.e. its pre-activation is
> 0. Supported: OPT-family models (``OPTForCausalLM``: hook on ``fc1``, whose input is the FFN input
after ``final_layer_norm``) and ReLU Llama-style models (``model.layers[i].mlp.gate_proj`` with
``hidden_act`` relu or relu2: the neuron is active when relu(gate) > 0). The trace is written in
``sim.trace``'s format; with ``--save-inputs`` the FFN inputs go beside it as
``<TRACE stem>.inputs.safetensors`` (key ``ffn_input``, float32 [tokens, layers, d_model]) for
training predictors (``real.predictor``).

Prompts: a ``.jsonl`` file holds one prompt per line (a JSON string or ``{"text": ...}``); any other
file is one text cut into consecutive chunks of ``--seq-len`` tokens. Each prompt or chunk is run
as its own sequence (teacher-forced: the activations equal those of token-by-token decoding), and
the tokens of all sequences are concatenated in the trace (``meta.sequences`` gives their lengths).

Tokenization: the model dir's tokenizer when it has one; otherwise (or with ``--tokenizer bytes``)
the byte-level fallback: token ids = UTF-8 bytes % vocab_size. That is exactly the tokenizer of the
byte-level ``models/small-relu-opt`` (vocab 256); for other models it only gives valid ids, not
meaningful text, which is still fine for measuring weight-reading costs of a random-ish input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sim.atomic import atomic_path
from sim.errors import ConfigError, require
from sim.trace import Trace
from sim.trace_stats import format_summary, summarize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ---- model and FFN sites -------------------------------------------------------------------
def load_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM
    model_dir = Path(model_dir)
    require((model_dir / "config.json").exists(), "MODEL_DIR", f"{model_dir} has no config.json",
            "give a Hugging Face model directory (save_pretrained output)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def ffn_up_modules(model) -> list[torch.nn.Module]:
    """Per layer, the linear module whose output's sign decides which FFN neurons fire."""
    cfg = model.config
    if cfg.model_type == "opt":
        require(cfg.activation_function == "relu", "config.activation_function",
                f"is {cfg.activation_function!r}; only ReLU gives exact zeros", "use a ReLU OPT checkpoint")
        return [layer.fc1 for layer in model.model.decoder.layers]
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None and len(layers) and hasattr(getattr(layers[0], "mlp", None), "gate_proj"):
        act = getattr(cfg, "hidden_act", None)
        require(act in ("relu", "relu2"), "config.hidden_act",
                f"is {act!r}; the gate must be ReLU for exact zeros", "use a ReLU-fied Llama-style checkpoint")
        return [layer.mlp.gate_proj for layer in layers]
    raise ConfigError("MODEL_DIR", f"model type {cfg.model_type!r} is not supported",
                      "use an OPT-family or a ReLU Llama-style (mlp.gate_proj) checkpoint")


class FFNRecorder:
    """Context manager: while active, collects per layer the FFN input and the active mask."""

    def __init__(self, model, save_inputs: bool = False):
        self.modules = ffn_up_modules(model)
        self.save_inputs = save_inputs
        self.masks: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self._handles = []

    def _hook(self, layer: int):
        def hook(module, args, out):
            self.masks[layer].append((out.detach().reshape(-1, out.shape[-1]) > 0).cpu())
            if self.save_inputs:
                x = args[0].detach()
                self.inputs[layer].append(x.reshape(-1, x.shape[-1]).float().cpu())
        return hook

    def __enter__(self) -> "FFNRecorder":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def active(self) -> np.ndarray:
        """bool [tokens, layers, d_ff]."""
        return torch.stack([torch.cat(m) for m in self.masks], dim=1).numpy()

    def ffn_inputs(self) -> np.ndarray:
        """float32 [tokens, layers, d_model]."""
        return torch.stack([torch.cat(x) for x in self.inputs], dim=1).numpy()


# ---- tokens ----------------------------------------------------------------------------------
def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES)


def byte_tokens(text: str | bytes, vocab: int) -> np.ndarray:
    """The byte-level fallback: token ids = UTF-8 bytes % vocab."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) % vocab


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    require(path.exists(), "--prompts", f"{path} does not exist", "give a .txt or .jsonl file of prompts")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, dict):
            require("text" in item, "--prompts", f"{path}:{n} has no 'text' key", 'write {"text": "..."}')
            item = item["text"]
        out.append(str(item))
    return out


def tokenize(prompts: Sequence[str], model_dir: str | Path | None, vocab: int, seq_len: int,
             tokenizer: str = "auto", max_tokens: int | None = None) -> tuple[list[np.ndarray], str]:
    """Token sequences of at most ``seq_len`` ids (long prompts are cut into consecutive chunks)."""
    require(tokenizer in ("auto", "bytes"), "--tokenizer", f"unknown {tokenizer!r}", "use auto or bytes")
    use_hf = tokenizer == "auto" and model_dir is not None and has_tokenizer(model_dir)
    if use_hf:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        encode, kind = (lambda s: np.asarray(tok(s)["input_ids"], dtype=np.int64)), "hf"
    else:
        encode, kind = (lambda s: byte_tokens(s, vocab)), "bytes"
    seqs, total = [], 0
    for p in prompts:
        ids = encode(p)
        for s in range(0, len(ids), seq_len):
            chunk = ids[s:s + seq_len]
            if max_tokens is not None:
                chunk = chunk[:max_tokens - total]
            if len(chunk) >= 2:
                seqs.append(chunk)
                total += len(chunk)
            if max_tokens is not None and total >= max_tokens:
                return seqs, kind
    return seqs, kind


# ---- recording -------------------------------------------------------------------------------
@torch.no_grad()
def record(model, seqs: Sequence[np.ndarray], save_inputs: bool = False,
           batch: int = 8) -> tuple[np.ndarray, np.ndarray | None]:
    """(active bool [tokens, layers, d_ff], FFN inputs float32 [tokens, layers, d_model] or None)."""
    require(len(seqs) > 0, "prompts", "no sequence of at least 2 tokens", "give longer prompts")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(s) for s in seqs)
    require(max_pos is None or longest <= max_pos, "--seq-len",
            f"sequences of {longest} tokens exceed the model's {max_pos} positions", f"use --seq-len {max_pos}")
    with FFNRecorder(model, save_inputs) as rec:
        i = 0
        while i < len(seqs):                     # batch consecutive sequences of equal length
            j = i + 1
            while j < len(seqs) and j - i < batch and len(seqs[j]) == len(seqs[i]):
                j += 1
            model(input_ids=torch.from_numpy(np.stack(seqs[i:j])))
            i = j
        return rec.active(), (rec.ffn_inputs() if save_inputs else None)


def inputs_path(trace_path: str | Path) -> Path:
    p = Path(trace_path)
    return p.with_name(p.name.removesuffix(".npz") + ".inputs.safetensors")


def save_inputs(trace_path: str | Path, inputs: np.ndarray) -> Path:
    from safetensors.numpy import save_file
    path = inputs_path(trace_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"ffn_input": np.ascontiguousarray(inputs, dtype=np.float32)}, str(tmp),
                  metadata={"layout": "tokens, layers, d_model", "trace": Path(trace_path).name})
    return path


def load_inputs(trace_path: str | Path) -> np.ndarray:
    from safetensors.numpy import load_file
    path = inputs_path(trace_path)
    require(path.exists(), "trace inputs", f"{path} does not exist",
            "record the trace with --save-inputs (python -m real.record ... --save-inputs)")
    return load_file(str(path))["ffn_input"]


def trace_meta(model, model_dir: str | Path | None, seqs: Sequence[np.ndarray], tokenizer: str,
               prompts: str = "") -> dict:
    cfg = model.config
    return {"source": "recorded", "model": Path(model_dir).name if model_dir else cfg.model_type,
            "model_dir": str(model_dir or ""), "hf_architecture": type(model).__name__,
            "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
            "d_ff": getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", None),
            "tokenizer": tokenizer, "sequences": [int(len(s)) for s in seqs], "prompts": prompts}


def record_trace(model, model_dir, seqs, tokenizer: str, save_inputs_flag: bool = False,
                 prompts: str = "") -> tuple[Trace, np.ndarray | None]:
    active, inputs = record(model, seqs, save_inputs_flag)
    return Trace(active=active, meta=trace_meta(model, model_dir, seqs, tokenizer, prompts)), inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save-inputs", action="store_true", help="also save FFN inputs for predictor training")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--tokenizer", choices=("auto", "bytes"), default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    a = ap.parse_args(argv)
    model = load_model(a.model_dir)
    seqs, kind = tokenize(read_prompts(a.prompts), a.model_dir, model.config.vocab_size, a.seq_len,
                          a.tokenizer, a.max_tokens)
    trace, inputs = record_trace(model, a.model_dir, seqs, kind, a.save_inputs, str(a.prompts))
    trace.save(a.out)
    print(f"wrote {a.out} ({trace.tokens} tokens, tokenizer: {kind})")
    if inputs is not None:
        print(f"wrote {save_inputs(a.out, inputs)}")
    s = summarize(trace)
    print(format_summary(s))
    if a.json:
        a.json.write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
