"""Checkpoint -> flash directory in the paper's layouts (sim.layout.FlashLayout).

    python -m real.convert SRC DST --layout bundled|unbundled [--dtype float16] [--verify]
    python -m real.convert --verify-only DST

SRC is a Hugging Face checkpoint directory (config.json + *.safetensors; pickle checkpoints are
refused). Bundled: record i of layer l's file = [gate column i,] up column i, down row i, padded
to 4 KiB, so one read fetches a whole neuron. Unbundled: one file per matrix. Everything else
(attention, embeddings, norms, FFN biases) goes to ``resident.safetensors``. ``manifest.json`` is
written last, so an interrupted conversion never looks complete.

Python API: ``convert_checkpoint(src, dst, ...)``, ``convert_model(hf_model, dst, ...)`` for a
model built in memory, and ``write_random_flash(spec, dst, ...)`` for trace-driven runs at full
size (streams layer by layer; an OPT-6.7B geometry is 8.6 GB of FFN)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from real.flash_dir import (DTYPE_TO_ST, FORMAT, FORMAT_VERSION, MANIFEST, RESIDENT, AtomicWriter, FlashDir,
                            FlashDirError, TensorEntry, fsync_dir, write_safetensors)
from sim.errors import ConfigError
from sim.layout import FlashLayout
from sim.model_spec import ACTIVATIONS, ModelSpec

CHUNK_BYTES = 64 << 20   # records produced per write: bounded memory for any model size


# ---- architectures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` names its FFN and where its geometry sits in config.json.

    ``ffn``: (matrix, tensor suffix after ``layers.<i>.``, True if neurons are the tensor's columns).
    Matrices follow FlashLayout.matrices order: (gate,) up, down."""

    ffn: tuple[tuple[str, str, bool], ...]
    bias: str | None              # per-neuron bias of the up projection, kept in resident
    d_ff_key: str
    act_key: str
    default_act: str
    tied_default: bool
    layer_prefix: str = r"layers\.(\d+)\."


_GATED = Arch(ffn=(("gate", "mlp.gate_proj.weight", False), ("up", "mlp.up_proj.weight", False),
                   ("down", "mlp.down_proj.weight", True)),
              bias=None, d_ff_key="intermediate_size", act_key="hidden_act", default_act="silu",
              tied_default=False)
ARCHITECTURES: dict[str, Arch] = {
    "opt": Arch(ffn=(("up", "fc1.weight", False), ("down", "fc2.weight", True)), bias="fc1.bias",
                d_ff_key="ffn_dim", act_key="activation_function", default_act="relu", tied_default=True),
    "llama": _GATED, "mistral": _GATED, "qwen2": _GATED,
    "phi": Arch(ffn=(("up", "mlp.fc1.weight", False), ("down", "mlp.fc2.weight", True)), bias="mlp.fc1.bias",
                d_ff_key="intermediate_size", act_key="hidden_act", default_act="gelu_new", tied_default=False),
    "falcon": Arch(ffn=(("up", "mlp.dense_h_to_4h.weight", False), ("down", "mlp.dense_4h_to_h.weight", True)),
                   bias="mlp.dense_h_to_4h.bias", d_ff_key="ffn_hidden_size", act_key="activation",
                   default_act="gelu", tied_default=True, layer_prefix=r"h\.(\d+)\."),
}
TORCH_TO_DTYPE = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _arch_of(config: dict[str, Any], where: str) -> Arch:
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type", f"unknown architecture {mt!r}",
                          f"use a checkpoint of one of {sorted(ARCHITECTURES)} or add its FFN tensor names to "
                          "real.convert.ARCHITECTURES")
    return ARCHITECTURES[mt]


def spec_from_config(config: dict[str, Any], dtype: str, name: str, where: str = "config.json") -> ModelSpec:
    """ModelSpec fields from a Hugging Face config dict."""
    arch = _arch_of(config, where)

    def need(key: str) -> int:
        v = config.get(key)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{where}: {key}", f"missing or not a positive integer ({v!r})",
                              "use the config.json that came with the checkpoint")
        return v

    d_model, n_heads = need("hidden_size"), need("num_attention_heads")
    d_ff = config.get(arch.d_ff_key) or (4 * d_model if config.get("model_type") == "falcon" else None)
    if d_ff is None:
        d_ff = need(arch.d_ff_key)
    kv = int(config.get("num_key_value_heads") or config.get("num_kv_heads") or n_heads)
    act = str(config.get(arch.act_key) or arch.default_act)
    if act not in ACTIVATIONS:
        warnings.warn(f"{where}: FFN activation {act!r} gives no exact zeros; the flash method assumes a "
                      "ReLU-fied model (activation recorded as relu, original_activation as "
                      f"{act!r})", stacklevel=3)
    archs = config.get("architectures") or [""]
    return ModelSpec(name=name, n_layers=need("num_hidden_layers"), d_model=d_model, d_ff=int(d_ff),
                     n_heads=n_heads, vocab=need("vocab_size"), n_kv_heads=0 if kv == n_heads else kv,
                     dtype=dtype, activation=act if act in ACTIVATIONS else "relu",
                     ffn_matrices=sum(1 for m in arch.ffn), tied_embeddings=bool(
                         config.get("tie_word_embeddings", arch.tied_default)),
                     original_activation=act, hf_architecture=str(archs[0]))


# ---- tensor sources ------------------------------------------------------------------------------
class TensorSource:
    """Name -> torch tensor, from safetensors files (lazily, memory-mapped) or a state dict."""

    def __init__(self, names: list[str], get: Callable[[str], Any], where: str,
                 meta: Callable[[str], tuple[tuple[int, ...], str]] | None = None):
        self.names, self.get, self.where = names, get, where
        self._meta = meta

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) without reading the tensor where the source knows them (a checkpoint's headers)."""
        if self._meta is not None:
            return self._meta(name)
        t = self.get(name)
        return tuple(t.shape), str(t.dtype).removeprefix("torch.")

    @staticmethod
    def from_checkpoint(src: str | Path) -> tuple["TensorSource", dict[str, Any]]:
        """A checkpoint directory's weights: the shards its ``model.safetensors.index.json`` lists, else
        ``model.safetensors``, else every ``*.safetensors`` (``real.hf_checkpoint.weight_files``). Tensors are
        read one at a time when asked for; shapes and dtypes come from the headers."""
        from real.hf_checkpoint import Checkpoint

        ckpt = Checkpoint.open(src, model_mode=False)
        src = ckpt.root
        shapes = {n: (i.shape, i.dtype) for n, i in ckpt.tensors.items()}
        return TensorSource(ckpt.names, ckpt.tensor, str(src), shapes.__getitem__), ckpt.config

    @staticmethod
    def from_state_dict(state: dict[str, Any], where: str = "<in-memory model>") -> "TensorSource":
        return TensorSource(list(state), state.__getitem__, where)


def _find_ffn(source: TensorSource, arch: Arch, spec: ModelSpec) -> list[dict[str, str]]:
    """Per layer: matrix name -> tensor name (and 'bias' if present); checks count and shapes."""
    found: dict[int, dict[str, str]] = {}
    for mat, suffix, _ in arch.ffn:
        pat = re.compile(r"(^|.*\.)" + arch.layer_prefix + re.escape(suffix) + "$")
        for name in source.names:
            m = pat.match(name)
            if m:
                found.setdefault(int(m.group(2)), {})[mat] = name
    if arch.bias:
        pat = re.compile(r"(^|.*\.)" + arch.layer_prefix + re.escape(arch.bias) + "$")
        for name in source.names:
            m = pat.match(name)
            if m and int(m.group(2)) in found:
                found[int(m.group(2))]["up_bias"] = name
    want = [m for m, _, _ in arch.ffn]
    layers = []
    for l in range(spec.n_layers):
        entry = found.get(l, {})
        miss = [m for m in want if m not in entry]
        if miss:
            raise ConfigError(f"{source.where}: layer {l}", f"no FFN tensor for {miss[0]!r} "
                              f"(expected a name ending in layers.{l}.{dict((a, b) for a, b, _ in arch.ffn)[miss[0]]})",
                              "check that the checkpoint matches config.json (num_hidden_layers, model_type)")
        for mat, _, transposed in arch.ffn:
            shape = tuple(source.meta(entry[mat])[0])
            expect = (spec.d_model, spec.d_ff) if transposed else (spec.d_ff, spec.d_model)
            if shape != expect:
                raise ConfigError(f"{source.where}: {entry[mat]}", f"shape {shape} is not {expect} "
                                  f"(d_model={spec.d_model}, d_ff={spec.d_ff} from config.json)",
                                  "use the config.json that came with these weights")
        layers.append(entry)
    return layers


# ---- writing records -----------------------------------------------------------------------------
MatrixChunk = Callable[[int, int, int], Any]   # (matrix index, start, stop) -> tensor [stop-start, d_model]


def _record_block(parts: list[Any], record_bytes: int) -> np.ndarray:
    """Rows of [n, d_model] tensors side by side, as bytes, each row padded to ``record_bytes``."""
    import torch

    block = torch.cat([p.contiguous() for p in parts], dim=1) if len(parts) > 1 else parts[0].contiguous()
    raw = block.view(torch.uint8).numpy()
    if raw.shape[1] == record_bytes:
        return raw
    out = np.zeros((raw.shape[0], record_bytes), dtype=np.uint8)
    out[:, :raw.shape[1]] = raw
    return out


def _write_layer(dst: Path, layout: FlashLayout, layer: int, chunk: MatrixChunk) -> list[dict[str, Any]]:
    """Write one layer's FFN file(s); returns their manifest entries."""
    spec = layout.spec
    n_per = max(1, CHUNK_BYTES // layout.record_bytes)
    if n_per > RANDOM_BLOCK:
        n_per -= n_per % RANDOM_BLOCK      # whole random blocks per chunk (no block drawn twice)
    groups = [list(range(len(layout.matrices)))] if layout.bundled else [[m] for m in range(len(layout.matrices))]
    entries = []
    for g, mats in enumerate(groups):
        name = layout.files[layout.file_index(layer, g)]
        with AtomicWriter(dst / name) as w:
            for start in range(0, spec.d_ff, n_per):
                stop = min(spec.d_ff, start + n_per)
                w.write(_record_block([chunk(m, start, stop) for m in mats], layout.record_bytes))
        assert w.nbytes == layout.file_bytes(), (name, w.nbytes, layout.file_bytes())
        entries.append({"name": name, "bytes": w.nbytes, "sha256": w.sha256, "role": "ffn", "layer": layer,
                        "matrix": "bundle" if layout.bundled else layout.matrices[mats[0]]})
    return entries


def _tensor_entry(name: str, t: Any) -> TensorEntry:
    import torch

    codes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if t.dtype not in codes:
        raise ConfigError(name, f"dtype {t.dtype} cannot be stored", "cast the model to float16/bfloat16/float32")
    return TensorEntry(name, codes[t.dtype], tuple(t.shape),
                       lambda: [t.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)])


def _lazy_entry(source: TensorSource, name: str, tdtype: Any) -> TensorEntry:
    """``_tensor_entry`` of a source tensor that is read only while it is written (floating point cast to
    ``tdtype``), so a large model's resident part never sits in memory whole."""
    import torch

    shape, dt = source.meta(name)
    floating = getattr(torch, dt).is_floating_point
    probe = torch.empty(0, dtype=tdtype if floating else getattr(torch, dt))

    def produce():
        t = source.get(name)
        yield from _tensor_entry(name, t.to(tdtype) if floating else t).produce()

    return TensorEntry(name, _tensor_entry(name, probe).st_dtype, tuple(shape), produce)


def _begin(dst: Path) -> None:
    """Make DST and drop any old manifest first: from here on the directory is 'incomplete'."""
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / MANIFEST).exists():
        (dst / MANIFEST).unlink()
        fsync_dir(dst)
    for stale in dst.glob("*.tmp"):
        stale.unlink()


def _finish(dst: Path, spec: ModelSpec, layout: FlashLayout, files: list[dict[str, Any]],
            ffn_tensors: list[dict[str, str]], source: str, resident: bool) -> FlashDir:
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "model": spec.to_dict(), "dtype": spec.dtype,
        "layout": "bundled" if layout.bundled else "unbundled", "align": layout.align,
        "record_bytes": layout.record_bytes, "neuron_bytes": spec.neuron_bytes, "matrices": list(layout.matrices),
        "resident": RESIDENT if resident else None, "ffn_tensors": ffn_tensors, "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": files,
    }
    with AtomicWriter(dst / MANIFEST) as w:
        w.write(json.dumps(manifest, indent=1).encode())
    return FlashDir.open(dst)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)


def convert_source(source: TensorSource, config: dict[str, Any], dst: str | Path, layout: str = "bundled",
                   dtype: str | None = None, name: str | None = None, progress: bool = True) -> FlashDir:
    """Convert any tensor source; the one code path behind the CLI and the in-memory API."""
    import torch

    if layout not in ("bundled", "unbundled"):
        raise ConfigError("--layout", f"unknown layout {layout!r}", "use bundled or unbundled")
    dst = Path(dst)
    arch = _arch_of(config, source.where)
    first = next((n for n in source.names if n.endswith(arch.ffn[0][1])), None)
    if first is None:
        raise ConfigError(source.where, f"no tensor named *{arch.ffn[0][1]} for model_type "
                          f"{config.get('model_type')!r}", "check that config.json belongs to these weights")
    src_dtype = source.meta(first)[1]
    dtype = dtype or src_dtype
    if dtype not in TORCH_TO_DTYPE:
        raise ConfigError("--dtype", f"FFN weights are {dtype}, which the flash layout does not store",
                          "pass --dtype float16 (or bfloat16/float32) to cast")
    tdtype = getattr(torch, dtype)
    spec = spec_from_config(config, dtype, name or Path(str(config.get("_name_or_path") or dst.name)).name or
                            "model", where=f"{source.where}/config.json")
    flash = FlashLayout(spec, bundled=layout == "bundled")
    ffn = _find_ffn(source, arch, spec)
    ffn_weights = {ffn[l][m] for l in range(spec.n_layers) for m, _, _ in arch.ffn}

    _begin(dst)
    files: list[dict[str, Any]] = []
    bar = _progress(spec.n_layers + 1, f"convert {spec.name} ({layout})", progress)
    for l in range(spec.n_layers):
        mats = []
        for mat, _, transposed in arch.ffn:
            t = source.get(ffn[l][mat]).to(tdtype)
            mats.append(t.t() if transposed else t)       # rows = neurons
        files += _write_layer(dst, flash, l, lambda m, a, b: mats[m][a:b])
        bar.update(1)
    resident_names = [n for n in source.names if n not in ffn_weights
                      and not (spec.tied_embeddings and n == "lm_head.weight")]
    entries = [_lazy_entry(source, n, tdtype) for n in resident_names]   # read when written: one at a time
    nbytes, digest = write_safetensors(dst / RESIDENT, entries, {"format": "pt"})
    files.append({"name": RESIDENT, "bytes": nbytes, "sha256": digest, "role": "resident"})
    bar.update(1)
    bar.close()
    return _finish(dst, spec, flash, files, ffn, source.where, resident=True)


def convert_checkpoint(src: str | Path, dst: str | Path, layout: str = "bundled", dtype: str | None = None,
                       name: str | None = None, progress: bool = True) -> FlashDir:
    source, config = TensorSource.from_checkpoint(src)
    return convert_source(source, config, dst, layout, dtype, name or Path(src).name, progress)


def convert_model(model: Any, dst: str | Path, layout: str = "bundled", dtype: str | None = None,
                  name: str | None = None, progress: bool = False) -> FlashDir:
    """Convert a transformers model built in memory (e.g. ``OPTForCausalLM(OPTConfig(...))``)."""
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    source = TensorSource.from_state_dict(dict(model.state_dict()))
    return convert_source(source, config, dst, layout, dtype, name or config.get("model_type", "model"), progress)


# ---- random weights of any geometry, streamed -----------------------------------------------------
def _resident_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Resident tensors named like OPT (2 FFN matrices) or Llama (3), so the engine finds them."""
    d, kv = spec.d_model, spec.kv_heads * spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = []
    if spec.ffn_matrices == 2:
        p = "model.decoder."
        out += [(p + "embed_tokens.weight", (spec.vocab, d)), (p + "embed_positions.weight", (2050, d))]
        for l in range(spec.n_layers):
            q = f"{p}layers.{l}."
            for proj, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("out_proj", d)):
                out += [(q + f"self_attn.{proj}.weight", (rows, d)), (q + f"self_attn.{proj}.bias", (rows,))]
            out += [(q + "self_attn_layer_norm.weight", (d,)), (q + "self_attn_layer_norm.bias", (d,)),
                    (q + "fc1.bias", (spec.d_ff,)), (q + "fc2.bias", (d,)),
                    (q + "final_layer_norm.weight", (d,)), (q + "final_layer_norm.bias", (d,))]
        out += [(p + "final_layer_norm.weight", (d,)), (p + "final_layer_norm.bias", (d,))]
    else:
        out += [("model.embed_tokens.weight", (spec.vocab, d))]
        for l in range(spec.n_layers):
            q = f"model.layers.{l}."
            out += [(q + "self_attn.q_proj.weight", (d, d)), (q + "self_attn.k_proj.weight", (kv, d)),
                    (q + "self_attn.v_proj.weight", (kv, d)), (q + "self_attn.o_proj.weight", (d, d)),
                    (q + "input_layernorm.weight", (d,)), (q + "post_attention_layernorm.weight", (d,))]
        out += [("model.norm.weight", (d,))]
    if not spec.tied_embeddings:
        out += [("lm_head.weight", (spec.vocab, d))]
    return out


RANDOM_BLOCK = 256   # random rows are drawn per block of neurons, so weights do not depend on the layout


_NORMAL_TABLES: dict[tuple[str, float], np.ndarray] = {}


def _normal_table(dtype: str, std: float) -> np.ndarray:
    """65536 N(0, std) quantiles, stored as the dtype's raw bits: a uniform 16-bit draw indexes
    it, which gives normal weights at memory speed (drawing normals directly took minutes for 8 GB)."""
    import torch

    key = (dtype, std)
    if key not in _NORMAL_TABLES:
        p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
        q = (torch.special.ndtri(p) * std).to(getattr(torch, dtype))
        bits = torch.uint16 if q.element_size() == 2 else torch.uint32
        _NORMAL_TABLES[key] = q.view(bits).numpy() if bits is torch.uint16 else q.numpy()
    return _NORMAL_TABLES[key]


def _random_block(seed: int, key: tuple[int, ...], shape: tuple[int, ...], dtype: str, std: float) -> Any:
    import torch

    rng = np.random.default_rng(np.random.SeedSequence([seed, *key]))
    table = _normal_table(dtype, std)
    vals = np.take(table, rng.integers(0, 65536, size=shape, dtype=np.uint16))
    t = torch.from_numpy(vals)
    return t.view(getattr(torch, dtype)) if table.dtype == np.uint16 else t


def _random_rows(seed: int, layer: int, matrix: int, a: int, b: int, spec: ModelSpec, std: float) -> Any:
    import torch

    first, last = a // RANDOM_BLOCK, (b - 1) // RANDOM_BLOCK
    blocks = [_random_block(seed, (layer, matrix, k), (RANDOM_BLOCK, spec.d_model), spec.dtype, std)
              for k in range(first, last + 1)]
    rows = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return rows[a - first * RANDOM_BLOCK:b - first * RANDOM_BLOCK]


def write_random_flash(spec: ModelSpec, dst: str | Path, layout: str = "bundled", seed: int = 0,
                       std: float = 0.02, resident: bool = True, progress: bool = True) -> FlashDir:
    """Random N(0, std) weights of ``spec`` straight to a flash directory, layer by layer (memory
    stays at one chunk of records), for trace-driven runs at sizes no checkpoint is at hand for.
    The same seed gives the same weights in either layout."""
    dst = Path(dst)
    flash = FlashLayout(spec, bundled=layout == "bundled")
    _begin(dst)
    files: list[dict[str, Any]] = []
    names = (["gate"] if spec.ffn_matrices == 3 else []) + ["up", "down"]
    ffn_tensors = []
    bar = _progress(spec.n_layers + int(resident), f"random {spec.name} ({layout})", progress)
    for l in range(spec.n_layers):
        files += _write_layer(dst, flash, l, lambda m, a, b: _random_rows(seed, l, m, a, b, spec, std))
        ffn_tensors.append({m: f"random:layer{l}.{m}" for m in names})
        bar.update(1)
    if resident:
        entries = []
        for i, (n, shape) in enumerate(_resident_shapes(spec)):
            def produce(i=i, shape=shape):
                rows = max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:], dtype=np.int64))))
                for a in range(0, shape[0], rows):
                    b = min(shape[0], a + rows)
                    t = _random_block(seed, (1 << 20, i, a), (b - a, *shape[1:]), spec.dtype, std)
                    yield t.view(__import__("torch").uint8).numpy().reshape(-1)
            entries.append(TensorEntry(n, DTYPE_TO_ST[spec.dtype], shape, produce))
        nbytes, digest = write_safetensors(dst / RESIDENT, entries, {"format": "pt", "random_seed": str(seed)})
        files.append({"name": RESIDENT, "bytes": nbytes, "sha256": digest, "role": "resident"})
        bar.update(1)
    bar.close()
    return _finish(dst, spec, flash, files, ffn_tensors, f"random(seed={seed}, std={std})", resident)


# ---- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m real.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", help="Hugging Face checkpoint dir (config.json + *.safetensors)")
    ap.add_argument("dst", help="flash directory to write (or check, with --verify-only)")
    ap.add_argument("--layout", choices=("bundled", "unbundled"), default="bundled")
    ap.add_argument("--dtype", choices=sorted(TORCH_TO_DTYPE), default=None, help="cast weights (default: keep)")
    ap.add_argument("--name", default=None, help="model name recorded in the manifest")
    ap.add_argument("--random", metavar="PRESET", default=None,
                    help="write random weights of a model preset (conf/model/PRESET.yaml) instead of SRC")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="re-hash every file after writing")
    ap.add_argument("--verify-only", action="store_true", help="only check an existing conversion in DST")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.verify_only:
            d = FlashDir.open(args.dst)
            d.verify(progress=not args.no_progress)
            print(f"{args.dst}: OK ({d.manifest['layout']}, {len(d.manifest['files'])} files, sha256 match)")
            return 0
        if args.random:
            spec = ModelSpec.preset(args.random)
            if args.dtype:
                spec = ModelSpec.from_dict({**spec.to_dict(), "dtype": args.dtype})
            d = write_random_flash(spec, args.dst, args.layout, seed=args.seed, progress=not args.no_progress)
        elif args.src is None:
            ap.error("SRC is required (or --random PRESET / --verify-only)")
        else:
            d = convert_checkpoint(args.src, args.dst, args.layout, args.dtype, args.name,
                                   progress=not args.no_progress)
        if args.verify:
            d.verify(progress=not args.no_progress)
        total = sum(f["bytes"] for f in d.manifest["files"])
        print(f"{args.dst}: {d.spec.name} {d.manifest['layout']}, record {d.layout.record_bytes} B, "
              f"{len(d.manifest['files'])} files, {total / 1e9:.3f} GB" + (", verified" if args.verify else ""))
        return 0
    except (ConfigError, FlashDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
