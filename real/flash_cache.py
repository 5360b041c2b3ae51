"""Converted flash directories kept in a cache folder, built on first use, so ``backend=real`` works
out of the box without downloads.

- A preset with ``hf_architecture: OPTForCausalLM`` that is small (opt-tiny, opt-small) becomes a
  random-init ``OPTForCausalLM`` built from its geometry (``build_opt``, seeded) and converted with
  ``real.convert.convert_model``; model mode runs that very model.
- Any other geometry (7B-class presets) gets random FFN weights streamed to flash by
  ``real.convert.write_random_flash`` (no resident file: trace mode makes its own attention).

Folder name: ``<model>-<layout>-<dtype>-s<seed>``; a folder whose manifest disagrees with the spec
is rebuilt."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from real.flash_dir import FlashDir, FlashDirError
from sim.model_spec import ModelSpec

log = logging.getLogger("flashlab")
SMALL_MODEL_BYTES = 256 << 20     # built as a real HF model below this size, random FFN files above


def build_opt(spec: ModelSpec, seed: int = 0, up_bias: float = -0.2):
    """A random-init ``OPTForCausalLM`` of ``spec``'s geometry (float32 unless the spec says otherwise).

    HF initialises biases to zero, which makes about half of the ReLU neurons fire; ``up_bias`` shifts
    the fc1 biases down so that, as in trained OPT models, most neurons stay silent (about 85-90% for
    the init std 0.02), which is what windowing and the neuron cache are about."""
    from transformers import OPTConfig, OPTForCausalLM

    if spec.ffn_matrices != 2:
        raise ValueError(f"model.{spec.name}: build_opt makes OPT models (2 FFN matrices)")
    cfg = OPTConfig(vocab_size=spec.vocab, hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
                    ffn_dim=spec.d_ff, num_attention_heads=spec.n_heads, max_position_embeddings=2048,
                    word_embed_proj_dim=spec.d_model, do_layer_norm_before=True, activation_function="relu",
                    dropout=0.0, attention_dropout=0.0, tie_word_embeddings=spec.tied_embeddings,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = OPTForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.bias.fill_(up_bias)
    return model.to(getattr(torch, spec.dtype)).eval()


GEOMETRY = ("n_layers", "d_model", "d_ff", "n_heads", "vocab", "n_kv_heads", "dtype", "activation", "ffn_matrices")


def same_geometry(a: ModelSpec, b: ModelSpec) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in GEOMETRY)


def is_small_opt(spec: ModelSpec) -> bool:
    return spec.hf_architecture == "OPTForCausalLM" and spec.total_bytes <= SMALL_MODEL_BYTES


def flash_dir_for(spec: ModelSpec, bundled: bool, cache_dir: str | Path, seed: int = 0,
                  progress: bool = False) -> FlashDir:
    """The converted flash directory of ``spec`` in ``cache_dir``, created on first use."""
    from real.convert import convert_model, write_random_flash

    layout = "bundled" if bundled else "unbundled"
    root = Path(cache_dir).expanduser() / f"{spec.name}-{layout}-{spec.dtype}-s{seed}"
    try:
        d = FlashDir.open(root)
        if same_geometry(d.spec, spec) and d.layout.bundled == bundled:
            return d
        log.warning("%s holds another geometry; rebuilding it", root)
    except FlashDirError:
        pass
    root.parent.mkdir(parents=True, exist_ok=True)
    if is_small_opt(spec):
        log.info("building random-init %s (seed %d) and converting it to %s", spec.name, seed, root)
        d = convert_model(build_opt(spec, seed), root, layout=layout, dtype=spec.dtype, name=spec.name)
    else:
        log.info("writing random %s FFN weights (%.2f GB, %s) to %s", spec.name, spec.ffn_bytes / 1e9, layout, root)
        d = write_random_flash(spec, root, layout=layout, seed=seed, resident=False, progress=progress)
    if not same_geometry(d.spec, spec):
        raise FlashDirError(str(root), f"was written for {d.spec} instead of {spec}", "delete the folder and rerun")
    return d
