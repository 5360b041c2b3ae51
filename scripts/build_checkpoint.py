#!/usr/bin/env python3
"""Build a random-init checkpoint of a model preset in the Hugging Face layout, as a download would be.

    python scripts/build_checkpoint.py --model opt-6.7b --dtype float16 --out DIR [--shard-gib 5] [--seed 0]
    python scripts/build_checkpoint.py --model llama-2-7b --set n_layers=2 d_model=64 d_ff=256 n_heads=4 vocab=256 --out DIR

The geometry comes from conf/model/<name>.yaml (``--set key=value`` overrides fields, e.g. a small Llama for tests);
config.json is the preset's ``OPTConfig`` (or ``LlamaConfig`` with ``hidden_act: relu``); the weights follow
Hugging Face's initialisation (N(0, 0.02) weights, zero biases, unit norms), drawn tensor by tensor from seeded
generators and streamed into ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` of at most
``--shard-gib`` + ``model.safetensors.index.json``, so memory stays at one tensor (OPT-6.7B fp16: 13.3 GB on disk,
the largest tensor 0.4 GB). ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it; ``python -m real.convert DIR
FLASH --layout bundled`` converts it. A complete build of the same config in DIR is kept (``--force`` rebuilds).

Random weights have no realistic activation sparsity: with zero fc1 biases about half of the ReLU neurons fire per
token (a trained OPT: ~3%). Fine for exactness; for timing, see benchmarks/bench_peers.py."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from sim.errors import ConfigError  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402


def spec_for(model: str, dtype: str | None = None, overrides: list[str] | None = None) -> ModelSpec:
    data = ModelSpec.preset(model).to_dict()
    for kv in overrides or []:
        if "=" not in kv:
            raise ConfigError("--set", f"{kv!r} is not key=value", "e.g. --set n_layers=2 d_model=64")
        k, v = kv.split("=", 1)
        data[k] = yaml.safe_load(v)
    if dtype:
        data["dtype"] = dtype
    if overrides:
        data["name"] = f"{data['name']}-custom"
    return ModelSpec.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a preset of conf/model/ (OPT or Llama family)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                    help="weights' dtype (default: the preset's)")
    ap.add_argument("--shard-gib", type=float, default=5.0, help="largest shard, GiB (transformers' default: 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset fields")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR holds this checkpoint")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        from real.hf_checkpoint import Checkpoint, build_random_checkpoint
        spec = spec_for(args.model, args.dtype, args.set)
        t0 = time.perf_counter()
        out = build_random_checkpoint(spec, args.out, int(args.shard_gib * (1 << 30)), seed=args.seed,
                                      force=args.force, progress=not args.no_progress)
        ckpt = Checkpoint.open(out, model_mode=False)
        print(f"{out}: {spec.name} {spec.dtype}, {len(ckpt.files)} safetensors file(s), {ckpt.nbytes / 1e9:.2f} GB, "
              f"{len(ckpt.names)} tensors ({time.perf_counter() - t0:.1f} s)")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
