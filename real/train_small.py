"""Train the small ReLU OPT-style model that ships in ``models/small-relu-opt/``.

Why: no trained checkpoint can be downloaded here, yet traces, predictors and windowing only mean
something on a model whose ReLU activations came from training. This trains a byte-level (vocab 256)
OPT model on the Python standard library's sources (``real.corpus``) on CPU in a few minutes.

    python -m real.train_small --out models/small-relu-opt [--steps 1200] [--l1 0.0] [--seed 0]

Deterministic for a seed, a step count, torch's thread count and the Python version's stdlib text.
``--l1`` adds ``l1 * mean(relu(fc1(x)))`` over layers to the loss: a small activation penalty is
the usual trick to make a ReLU model sparser (used off by default; the report says what was used)."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from real.corpus import stdlib_bytes

BYTE_VOCAB = 256


def small_opt_config(n_layers: int = 4, d_model: int = 128, d_ff: int = 1024, n_heads: int = 4,
                     max_positions: int = 512):
    from transformers import OPTConfig
    return OPTConfig(vocab_size=BYTE_VOCAB, hidden_size=d_model, num_hidden_layers=n_layers, ffn_dim=d_ff,
                     num_attention_heads=n_heads, max_position_embeddings=max_positions,
                     word_embed_proj_dim=d_model, activation_function="relu", do_layer_norm_before=True,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                     pad_token_id=0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)


def _batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        idx = starts[:, None] + np.arange(seq + 1)[None, :]
        yield torch.from_numpy(data[idx].astype(np.int64))


def train(out: Path, steps: int, seed: int, l1: float, batch: int, seq: int, lr: float,
          n_layers: int, d_model: int, d_ff: int, n_heads: int, log_every: int = 50) -> dict:
    from transformers import OPTForCausalLM
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    data = np.frombuffer(stdlib_bytes("train"), dtype=np.uint8)
    cfg = small_opt_config(n_layers, d_model, d_ff, n_heads, max_positions=max(512, seq))
    model = OPTForCausalLM(cfg)
    model.train()
    fc1_acts: list[torch.Tensor] = []
    if l1 > 0:
        for layer in model.model.decoder.layers:
            layer.fc1.register_forward_hook(lambda m, i, o: fc1_acts.append(torch.relu(o)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(seed)
    batches = _batches(data, batch, seq, rng)
    log, t0 = [], time.time()
    for step in range(steps):
        xb = next(batches)
        fc1_acts.clear()
        logits = model(input_ids=xb[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, BYTE_VOCAB), xb[:, 1:].reshape(-1))
        loss = ce + (l1 * sum(a.mean() for a in fc1_acts) / len(fc1_acts) if fc1_acts else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "ce": round(ce.item(), 4), "s": round(time.time() - t0, 1)})
            print(f"step {step:5d}  ce {ce.item():.3f} nats/byte  {time.time() - t0:6.1f} s", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    meta = {"steps": steps, "seed": seed, "l1": l1, "batch": batch, "seq": seq, "lr": lr,
            "train_seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "corpus": "python stdlib .py files, train split of real.corpus (10% held out by path hash)",
            "tokenizer": "byte-level: token id = byte value (vocab 256); no tokenizer files", "log": log}
    (out / "training_meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/small-relu-opt"))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l1", type=float, default=0.0, help="activation L1 penalty (0 = off)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train(a.out, a.steps, a.seed, a.l1, a.batch, a.seq, a.lr, a.layers, a.d_model, a.d_ff, a.heads)


if __name__ == "__main__":
    sys.exit(main())
