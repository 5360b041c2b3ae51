"""Generate text with a Hugging Face checkpoint whose FFN weights are read from flash.

    python -m real.generate CHECKPOINT_DIR --prompt "..." --max-new-tokens N --memory-budget 0.5
        [--policy windowing_bundling] [--device auto] [--cache-dir DIR] [--predictor auto|oracle|FILE]
        [--verify] [--reconvert] [--threads N] [--ignore-eos]

    python -m real.generate models/small-relu-opt --prompt "The" --max-new-tokens 16     # works on a CPU

CHECKPOINT_DIR is a Hugging Face checkpoint directory (config.json + model.safetensors or shards with
model.safetensors.index.json) of an OPT model or a Llama-style model with a ReLU gate. On first use its FFN is
converted (``real.convert``, with a progress bar) into ``--cache-dir`` (default ``$FLASHLAB_CACHE_DIR`` or
``~/.cache/flashlab/flash``), in a folder named by the checkpoint's content, so a changed checkpoint is converted
again; then attention, embeddings, norms and the KV cache go to the device and every FFN is served from flash
through the policy engine's plans (``real.engine.HFFlashModel``). The text is printed as it is generated; at the
end: tokens/s, the per-token latency and its parts (io = reads in flight + copy to the device, mem = the neuron
cache's memory management, compute = the rest; as ``real.engine`` measures them) and the bytes read per token.

Predictor (which FFN neurons each token reads): ``auto`` = a trained ``predictor-*.safetensors`` in the checkpoint
directory if there is one (``real.predictor``; models/small-relu-opt ships one), else the oracle; ``oracle`` = the
exact ReLU mask of the live FFN input (output identical to the dense model's; it keeps a copy of the up projection
in memory beyond the budget: a measuring instrument, not a deployable predictor); or a predictor file.

Tokenizer: the checkpoint's own (tokenizer.json, ...) when it has one, else the byte-level fallback of
``real.record`` (token id = UTF-8 byte % vocab), which is exactly the tokenizer of models/small-relu-opt; for other
models without tokenizer files the ids are valid but not their real tokenization (ids >= 256 print as [id]).

Bad input (missing directory, no config.json, an architecture model mode does not run, a memory budget below
what must stay resident, a predictor of another model, a prompt longer than the model's positions, a flash file
changed after conversion) stops with one ``error: ... Fix: ...`` line before any long work. Flash files are
checked on every run before generation starts: the manifest and each file's size, and every file whose mtime
changed since it was last hashed is re-hashed (sha256) against the manifest; a flash directory under 1 GiB is
re-hashed whole every time, and ``--verify`` re-hashes all files of any size."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from pathlib import Path

import numpy as np

from sim.errors import ConfigError, require

DEFAULT_CACHE = os.environ.get("FLASHLAB_CACHE_DIR", "~/.cache/flashlab/flash")


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- tokenizers ------------------------------------------------------------------------------------
class ByteTokenizer:
    """The byte-level fallback (real.record.byte_tokens): id = UTF-8 byte % vocab; decoded incrementally."""

    kind = "bytes"

    def __init__(self, vocab: int):
        self.vocab = vocab
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def encode(self, text: str) -> list[int]:
        from real.record import byte_tokens
        return [int(t) for t in byte_tokens(text, self.vocab)]

    def stream(self, token: int) -> str:
        if token < 256:
            return self._dec.decode(bytes([token]))
        return self._dec.decode(b"", final=True) + f"[{token}]"

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    kind = "hf"

    def __init__(self, root: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(root))
        self.ids: list[int] = []
        self.shown = ""

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def stream(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait for the rest
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        return ""


def tokenizer_for(root: Path, vocab: int, choice: str):
    from real.record import has_tokenizer
    if choice == "bytes" or (choice == "auto" and not has_tokenizer(root)):
        why = "--tokenizer bytes" if choice == "bytes" else f"{root} has no tokenizer files"
        return ByteTokenizer(vocab), (f"{why}: byte-level fallback (token id = UTF-8 byte % {vocab})"
                                      + ("" if vocab == 256 else "; not this model's real tokenization"))
    try:
        return HFTokenizer(root), f"tokenizer from {root}"
    except Exception as e:  # noqa: BLE001 -- any failure to build it is the same user problem
        raise ConfigError("tokenizer", f"the tokenizer files in {root} cannot be loaded ({type(e).__name__}: {e})",
                          "repair them, or pass --tokenizer bytes for the byte-level fallback") from None


# ---- checks before any long work ---------------------------------------------------------------------
def _budget_error(e: ConfigError) -> ConfigError:
    if e.field.startswith("policy.memory_budget"):
        return ConfigError("--memory-budget", e.problem, e.fix.replace("policy.memory_budget", "--memory-budget"))
    return e


def load_predictor(arg: str, root: Path, spec):
    """(predictor or None for the oracle, description)."""
    from real.predictor import LowRankPredictor
    if arg == "oracle":
        return None, "oracle (exact ReLU mask; keeps the up projection in memory beyond the budget)"
    if arg == "auto":
        found = sorted(root.glob("predictor-*.safetensors"))
        if not found:
            return None, ("oracle (no trained predictor-*.safetensors in the checkpoint directory; the oracle keeps "
                          "the up projection in memory beyond the budget)")
        path = found[0]
    else:
        path = Path(arg).expanduser()
        require(path.exists(), "--predictor", f"{path} does not exist",
                "give a predictor file (python -m real.predictor train), oracle or auto")
    p = LowRankPredictor.load(path)
    require(p.n_layers == spec.n_layers and p.A[0].shape[0] == spec.d_model and p.B[0].shape[1] == spec.d_ff,
            "--predictor", f"{path} predicts {p.n_layers} layers of {p.B[0].shape[1]} neurons from "
            f"d_model {p.A[0].shape[0]}, but the model has {spec.n_layers} x {spec.d_ff}, d_model {spec.d_model}",
            "train a predictor for this model (python -m real.predictor train), or use --predictor oracle")
    return p, f"trained rank-{p.rank} predictor {path}"


def prepare(args):
    """Every check a user can fail, in order, before conversion or loading: returns what ``run`` needs."""
    from real.hf_checkpoint import Checkpoint
    from sim.plan import ffn_cache_neurons
    from sim.policy import Policy

    require(args.max_new_tokens >= 1, "--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}",
            "e.g. --max-new-tokens 16")
    require(0 < args.memory_budget <= 1, "--memory-budget", f"must be a fraction in (0, 1], got {args.memory_budget}",
            "e.g. --memory-budget 0.5 for half the model's bytes in memory")
    require(bool(args.prompt), "--prompt", "is empty", 'give some text, e.g. --prompt "The"')
    ckpt = Checkpoint.open(args.checkpoint)
    spec = ckpt.spec()
    predictor, pred_note = load_predictor(args.predictor, ckpt.root, spec)
    try:
        base = Policy.preset(args.policy).to_dict()
    except ConfigError as e:
        raise ConfigError("--policy", e.problem, e.fix) from None
    knobs = {"memory_budget": float(args.memory_budget)}
    if predictor is not None:
        knobs["predictor_rank"] = predictor.rank
    try:
        policy = Policy.from_dict({**base, **knobs})
        capacity = ffn_cache_neurons(spec, policy)
    except ConfigError as e:
        raise _budget_error(e) from None
    tok, tok_note = tokenizer_for(ckpt.root, spec.vocab, args.tokenizer)
    ids = tok.encode(args.prompt)
    require(len(ids) > 0, "--prompt", "gives no tokens", "give some text")
    max_pos = int(ckpt.config.get("max_position_embeddings") or 1 << 30)
    require(len(ids) + args.max_new_tokens <= max_pos, "--max-new-tokens",
            f"{args.max_new_tokens} after a {len(ids)}-token prompt passes the model's {max_pos} positions",
            f"use --max-new-tokens {max(1, max_pos - len(ids))} or less, or a shorter prompt")
    from real.engine import resolve_device
    device = resolve_device(args.device)
    return dict(ckpt=ckpt, spec=spec, policy=policy, capacity=capacity, predictor=predictor, pred_note=pred_note,
                tok=tok, tok_note=tok_note, ids=ids, device=device)


# ---- the run -------------------------------------------------------------------------------------------
def run(args, out=None) -> dict:
    out = out or sys.stdout
    p = prepare(args)
    import torch

    from real.engine import HFFlashModel
    from real.hf_checkpoint import converted_flash

    ckpt, spec, policy, device = p["ckpt"], p["spec"], p["policy"], p["device"]
    progress = not args.no_progress
    info(f"model: {ckpt.root} ({spec.hf_architecture}, {spec.n_layers} layers, d_model {spec.d_model}, d_ff {spec.d_ff}, "
         f"{spec.dtype}, {spec.total_bytes / 1e9:.3f} GB); device: {device}")
    info(f"policy: {args.policy}, memory budget {policy.memory_budget:g} ({policy.memory_budget * spec.total_bytes / 1e9:.3f} "
         f"GB): FFN cache {p['capacity']} of {spec.d_ff} neurons per layer; predictor: {p['pred_note']}")
    info(p["tok_note"])
    flash = converted_flash(ckpt, args.cache_dir, policy.bundling, spec.dtype, progress=progress,
                            reconvert=args.reconvert, verify=args.verify, log=info)
    from real.hf_checkpoint import FULL_CHECK_BELOW
    whole = args.verify or sum(e["bytes"] for e in flash.manifest["files"]) < FULL_CHECK_BELOW
    info(f"flash: {flash.root} ({'every file re-hashed' if whole else 'checked: manifest, sizes, files changed since last hashed re-hashed'})")
    if device.type == "cpu" and args.threads_torch is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))   # leave cores to the reader threads
    elif args.threads_torch:
        torch.set_num_threads(args.threads_torch)
    t_load = time.perf_counter()
    m = HFFlashModel.from_checkpoint(ckpt, flash, policy, device=device, predictor=p["predictor"],
                                     threads=args.threads or policy.reads_in_flight, progress=progress)
    info(f"loaded the resident weights in {time.perf_counter() - t_load:.1f} s")
    tok, ids = p["tok"], list(p["ids"])
    eos = ckpt.config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    costs = []
    try:
        out.write(args.prompt)
        out.flush()
        t0 = time.perf_counter()
        logits, prefill = m.step(torch.tensor([ids]))
        new = []
        while True:
            nxt = int(logits[0].argmax())
            new.append(nxt)
            out.write(tok.stream(nxt))
            out.flush()
            if len(new) >= args.max_new_tokens or (nxt in eos and not args.ignore_eos):
                break
            logits, tc = m.step(torch.tensor([[nxt]]))
            costs.append(tc)
        wall = time.perf_counter() - t0
        out.write(tok.flush() + "\n")
    finally:
        m.close()
    stats = summarize(prefill, costs, len(p["ids"]), len(new), wall)
    out.write(format_stats(stats) + "\n")
    out.flush()
    return {**stats, "tokens": new, "flash": str(flash.root)}


def summarize(prefill, costs, n_prompt: int, n_new: int, wall: float) -> dict:
    mean = lambda f: float(np.mean([f(c) for c in costs])) if costs else float("nan")  # noqa: E731
    lat = mean(lambda c: c.latency_s)
    return {"prompt_tokens": n_prompt, "new_tokens": n_new, "decode_steps": len(costs), "wall_s": wall,
            "prefill_ms": prefill.latency_s * 1e3, "prefill_bytes": prefill.bytes,
            "tokens_per_s": (1.0 / lat) if costs else float("nan"), "latency_ms": lat * 1e3,
            "io_ms": mean(lambda c: c.io_s) * 1e3, "mem_ms": mean(lambda c: c.mem_s) * 1e3,
            "compute_ms": mean(lambda c: c.compute_s) * 1e3, "bytes_per_token": mean(lambda c: c.bytes),
            "reads_per_token": mean(lambda c: c.reads)}


def format_stats(s: dict) -> str:
    lines = [f"--- {s['new_tokens']} new tokens in {s['wall_s']:.2f} s; prefill of {s['prompt_tokens']} prompt tokens "
             f"{s['prefill_ms']:.1f} ms ({s['prefill_bytes'] / 1e6:.2f} MB read)"]
    if s["decode_steps"]:
        lines.append(f"decode: {s['tokens_per_s']:.2f} tokens/s; per token {s['latency_ms']:.2f} ms = io {s['io_ms']:.2f} "
                     f"(overlaps compute) + mem {s['mem_ms']:.2f} + compute {s['compute_ms']:.2f} ms; "
                     f"{s['bytes_per_token'] / 1e6:.3f} MB read per token in {s['reads_per_token']:.1f} reads "
                     f"(means over {s['decode_steps']} decode steps)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m real.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--memory-budget", type=float, default=0.5,
                    help="fraction of the model's bytes that may sit in memory (default 0.5)")
    ap.add_argument("--policy", default="windowing_bundling", help="naive|predictor|windowing|windowing_bundling")
    ap.add_argument("--predictor", default="auto", help="auto|oracle|FILE (see above)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"converted flash directories (default {DEFAULT_CACHE})")
    ap.add_argument("--tokenizer", default="auto", choices=("auto", "bytes"))
    ap.add_argument("--verify", action="store_true", help="re-hash every flash file before generating")
    ap.add_argument("--reconvert", action="store_true", help="convert the checkpoint again")
    ap.add_argument("--threads", type=int, default=0, help="reads in flight (0: the policy's reads_in_flight)")
    ap.add_argument("--threads-torch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
        return 0
    except ConfigError as e:          # FlashDirError is one too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
