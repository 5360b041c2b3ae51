"""Hugging Face checkpoint directories for model mode, at any size.

A checkpoint directory is the standard layout: ``config.json`` plus ``model.safetensors``, or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (what ``save_pretrained`` writes
and a hub download holds; ``scripts/build_checkpoint.py`` writes the same from a preset with random weights).

- ``Checkpoint.open(dir)`` checks the directory before any long work (missing, no config.json, an architecture
  model mode does not run, no safetensors) and reads only the safetensors headers: names, dtypes, shapes.
- ``resident_model(ckpt, device)`` builds the model's skeleton on the ``meta`` device, removes its FFN modules,
  and fills every other parameter (attention, embeddings, norms, positions) tensor by tensor from the shards
  with ``safe_open``, straight onto ``device``; the FFN is never materialised. Per layer it also returns the FFN
  biases and, for the oracle, a copy of the projection whose sign decides which neurons fire (OPT ``fc1``,
  Llama ``gate_proj``): the oracle's measuring instrument, outside the memory budget.
- ``converted_flash(ckpt, cache_dir, bundled)`` is the flash directory of the checkpoint, converted on first use
  by ``real.convert`` into a cache folder named by the checkpoint's content (``content_key``), and checked
  on every open (``check_flash``).

Model mode runs OPT (``OPTForCausalLM``) and Llama-style gated FFNs with a ReLU gate (``LlamaForCausalLM`` with
``hidden_act: relu``); ``MODEL_MODE`` names them."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from real.flash_dir import MANIFEST, FlashDir, FlashDirError, sha256_file
from sim.errors import ConfigError, require
from sim.model_spec import ACTIVATIONS, ModelSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STAMP = "checked.json"          # per FFN/resident file: size, mtime_ns and sha256 when it was last hashed
FULL_CHECK_BELOW = 1 << 30      # flash directories smaller than this are re-hashed whole on every open (< ~1 s)
# model_type -> (the HF class model mode runs, where its FFN sits)
MODEL_MODE = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM (hidden_act relu or relu2)"}
ST_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
BUILD_HINT = "scripts/build_checkpoint.py --model opt-small --out DIR builds a random one"


def supported() -> str:
    return ", ".join(f"{k} ({v})" for k, v in MODEL_MODE.items())


# ---- the files of a checkpoint --------------------------------------------------------------------
def weight_files(root: str | Path) -> list[Path]:
    """The safetensors files that hold the model's weights: the shards the index lists, else
    ``model.safetensors``, else every ``*.safetensors`` in the directory. Other safetensors files beside a
    model (a trained predictor, say) are not weights when an index or ``model.safetensors`` is there."""
    root = Path(root)
    index = root / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(str(index), f"is not a safetensors index ({type(e).__name__}: {e})",
                              "restore the file from the checkpoint it came with") from None
        files = [root / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        require(not missing, str(root), f"lacks shard {missing[:1]} that {INDEX} lists",
                "copy the missing shards (or rebuild the checkpoint)")
        return files
    if (root / SINGLE).exists():
        return [root / SINGLE]
    return sorted(root.glob("*.safetensors"))


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` (name -> dtype, shape, data_offsets) and where the data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConfigError(str(path), "is not a safetensors file (shorter than 8 bytes)",
                              "restore the file from the checkpoint it came with")
        n = struct.unpack("<Q", raw)[0]
        if n > 100 << 20:
            raise ConfigError(str(path), f"is not a safetensors file (header length {n})",
                              "restore the file from the checkpoint it came with")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


@dataclass
class TensorInfo:
    file: Path
    dtype: str           # torch dtype name
    shape: tuple[int, ...]


class Checkpoint:
    """An opened, checked checkpoint directory; tensors are read one at a time, on demand."""

    def __init__(self, root: Path, config: dict[str, Any], files: list[Path], tensors: dict[str, TensorInfo]):
        self.root, self.config, self.files, self.tensors = root, config, files, tensors
        self._handles: dict[Path, Any] = {}

    # ---- opening: every check a user can fail, before any long work ---------------------------
    @classmethod
    def open(cls, path: str | Path, model_mode: bool = True) -> "Checkpoint":
        """Check ``path`` and read its config and headers. ``model_mode``: also require an architecture the
        engine's model mode runs (MODEL_MODE) with a ReLU FFN."""
        root = Path(path).expanduser()
        field = "CHECKPOINT_DIR"
        require(root.exists(), field, f"{root} does not exist",
                f"give a Hugging Face checkpoint directory (config.json + *.safetensors); {BUILD_HINT}")
        require(root.is_dir(), field, f"{root} is a file, not a directory",
                "give the directory that holds config.json and the *.safetensors files")
        cfg_path = root / "config.json"
        require(cfg_path.exists(), field, f"{root} has no config.json, so its architecture cannot be known",
                "give a Hugging Face checkpoint directory (save_pretrained output), which holds config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(str(cfg_path), f"is not valid JSON ({e})",
                              "restore the config.json that came with the checkpoint") from None
        mt = config.get("model_type")
        if model_mode:
            require(mt in MODEL_MODE, f"{cfg_path}: model_type",
                    f"{mt!r} ({(config.get('architectures') or ['?'])[0]}) is not an architecture model mode runs",
                    f"use a checkpoint of one of: {supported()}")
            act = config.get("activation_function" if mt == "opt" else "hidden_act") or "relu"
            require(act in ACTIVATIONS, f"{cfg_path}: {'activation_function' if mt == 'opt' else 'hidden_act'}",
                    f"is {act!r}, which gives no exact zeros, so the FFN cannot be read sparsely and exactly",
                    f"use a ReLU-fied checkpoint (one of {ACTIVATIONS})")
        files = weight_files(root)
        if not files:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise ConfigError(str(root), "holds no *.safetensors file" + (f" (only pickle files {pickles[:3]})"
                              if pickles else ""), "pickle checkpoints are never loaded; export the checkpoint as "
                              "safetensors (model.save_pretrained(dir, safe_serialization=True))")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            header, _ = read_header(f)
            for name, h in header.items():
                tensors[name] = TensorInfo(f, ST_TORCH.get(h["dtype"], h["dtype"]), tuple(h["shape"]))
        return cls(root, config, files, tensors)

    # ---- what it holds ---------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def find(self, name: str) -> str | None:
        """The checkpoint's name for a model parameter: itself, or without the base model prefix some
        checkpoints leave out (``decoder.layers...`` for ``model.decoder.layers...``)."""
        if name in self.tensors:
            return name
        if name.startswith("model.") and name[len("model."):] in self.tensors:
            return name[len("model."):]
        return None

    def ffn_dtype(self) -> str:
        """The dtype of the FFN weights (what the flash directory stores by default)."""
        from real.convert import _arch_of
        suffix = _arch_of(self.config, str(self.root)).ffn[0][1]
        first = next((n for n in self.names if n.endswith(suffix)), None)
        require(first is not None, str(self.root), f"has no FFN tensor named *{suffix}",
                "check that config.json belongs to these weights")
        return self.tensors[first].dtype

    def spec(self, dtype: str | None = None) -> ModelSpec:
        from real.convert import spec_from_config
        return spec_from_config(self.config, dtype or self.ffn_dtype(), self.root.name,
                                where=str(self.root / "config.json"))

    def tensor(self, name: str):
        """One tensor, read from its shard (a CPU torch tensor; nothing else is loaded)."""
        from safetensors import safe_open
        info = self.tensors[name]
        h = self._handles.get(info.file)
        if h is None:
            h = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def content_key(self, samples: int = 16, sample_bytes: int = 64 << 10) -> str:
        """A name for the checkpoint's content, cheap at any size: sha256 over config.json, and per weight
        file its name, size, safetensors header (every tensor's name, dtype, shape and offsets) and
        ``samples`` blocks of ``sample_bytes`` spread evenly over its data. A rebuilt or re-downloaded
        checkpoint that differs gets another key; an edit of a few bytes in place between the sampled blocks
        would not (``python -m real.generate --reconvert`` converts again regardless)."""
        h = hashlib.sha256()
        h.update((self.root / "config.json").read_bytes())
        for f in self.files:
            size = f.stat().st_size
            _, data_start = read_header(f)
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(data_start))
                span = max(0, size - data_start - sample_bytes)
                for i in range(samples):
                    fh.seek(data_start + span * i // max(1, samples - 1))
                    h.update(fh.read(sample_bytes))
        return h.hexdigest()


# ---- where the FFN sits, per family ------------------------------------------------------------------
def decoder_layers(model):
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


def strip_ffn(model) -> None:
    """Replace every layer's FFN modules by identities (they hold no parameters afterwards); the engine
    puts its FFN sites there."""
    import torch
    for layer in decoder_layers(model):
        if model.config.model_type == "opt":
            layer.fc1, layer.activation_fn, layer.fc2 = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
        else:
            layer.mlp = torch.nn.Identity()


def ffn_names(model_type: str, layer: int) -> dict[str, str]:
    """The checkpoint names of layer ``layer``'s FFN tensors (as the model names them)."""
    if model_type == "opt":
        p = f"model.decoder.layers.{layer}."
        return {"up": p + "fc1.weight", "up_bias": p + "fc1.bias", "down": p + "fc2.weight",
                "down_bias": p + "fc2.bias"}
    p = f"model.layers.{layer}.mlp."
    return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}


# ---- building the resident part of a model ----------------------------------------------------------
def resident_model(ckpt: Checkpoint, device, dtype: str | None = None, oracle: bool = True, progress: bool = False):
    """(model, parts): the HF model of ``ckpt`` on ``device`` with its FFN modules stripped (``strip_ffn``)
    and every other weight loaded from the checkpoint, one tensor at a time; ``parts`` per layer: ``up_bias``,
    ``down_bias`` (None where the model has none) and, with ``oracle``, ``oracle_w`` / ``oracle_b``: the
    projection whose sign decides which neurons fire (OPT fc1 and its bias, Llama gate_proj)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    tdtype = getattr(torch, dtype or ckpt.ffn_dtype())
    config = AutoConfig.from_pretrained(str(ckpt.root))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    strip_ffn(model)
    model = model.to(tdtype)
    model.to_empty(device=device)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict(keep_vars=True)
    missing = []
    names = list(state)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="load attention/embeddings", unit="tensor", leave=False)
    with torch.no_grad():
        for name in names:
            src = ckpt.find(name)
            if src is None:
                if not (tied and name == "lm_head.weight"):
                    missing.append(name)
            else:
                t = ckpt.tensor(src)
                p = state[name]
                require(tuple(t.shape) == tuple(p.shape), f"{ckpt.root}: {src}",
                        f"shape {tuple(t.shape)} is not the model's {tuple(p.shape)}",
                        "use the config.json that came with these weights")
                p.copy_(t.to(p.dtype) if p.is_floating_point() else t)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    _rebuild_buffers(model, config, device, missing)
    require(not missing, f"{ckpt.root}", f"has no tensor for {missing[0]} (and {len(missing) - 1} more)"
            if missing else "", "check that config.json belongs to these weights")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    parts = []
    for l in range(len(decoder_layers(model))):
        n = ffn_names(ckpt.model_type, l)
        get = lambda key: (ckpt.tensor(ckpt.find(n[key])).to(device=device, dtype=tdtype)  # noqa: E731
                           if key in n and ckpt.find(n[key]) is not None else None)
        part = {"up_bias": get("up_bias"), "down_bias": get("down_bias")}
        if oracle:
            part["oracle_w"] = get("gate" if "gate" in n else "up")
            part["oracle_b"] = part["up_bias"]
            require(part["oracle_w"] is not None, f"{ckpt.root}: layer {l}",
                    "has no FFN projection for the oracle", "check that config.json belongs to these weights")
        parts.append(part)
    return model, parts


def _rebuild_buffers(model, config, device, missing: list[str]) -> None:
    """Buffers that no checkpoint holds (a rotary embedding's inverse frequencies) are computed in the
    module's constructor, which ``to_empty`` skipped: build those modules again on ``device``. Any other
    buffer outside the state dict would be left uninitialised: it is reported in ``missing``."""
    rebuilt = []
    for mname, module in list(model.named_modules()):
        if "RotaryEmbedding" not in type(module).__name__:
            continue
        fresh = type(module)(config=getattr(module, "config", config)).to(device)
        parent = model.get_submodule(mname.rsplit(".", 1)[0]) if "." in mname else model
        setattr(parent, mname.rsplit(".", 1)[-1], fresh)
        rebuilt.append(mname + ".")
    for mname, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            full = f"{mname}.{b}" if mname else b
            if not any(full.startswith(r) for r in rebuilt):
                missing.append(full)


# ---- the converted flash directory, cached by content -------------------------------------------------
def flash_root(ckpt: Checkpoint, cache_dir: str | Path, bundled: bool, dtype: str | None = None) -> Path:
    dtype = dtype or ckpt.ffn_dtype()
    key = ckpt.content_key()[:16]
    return Path(cache_dir).expanduser() / f"{ckpt.root.name}-{key}-{'bundled' if bundled else 'unbundled'}-{dtype}"


def converted_flash(ckpt: Checkpoint, cache_dir: str | Path, bundled: bool = True, dtype: str | None = None,
                    progress: bool = True, reconvert: bool = False, verify: bool = False, log=None) -> FlashDir:
    """The flash directory of ``ckpt`` in ``cache_dir``: converted now (``real.convert``, with a progress bar)
    if there is none or ``reconvert``, else opened and checked (``check_flash``: whole re-hash with ``verify`` or
    below ``FULL_CHECK_BELOW`` bytes, else the stamp check)."""
    from real.convert import convert_checkpoint

    root = flash_root(ckpt, cache_dir, bundled, dtype)
    if reconvert or not (root / MANIFEST).exists():
        if log:
            log(f"converting {ckpt.root} -> {root} (first use: FFN to flash, {'bundled' if bundled else 'unbundled'})")
        root.parent.mkdir(parents=True, exist_ok=True)
        d = convert_checkpoint(ckpt.root, root, "bundled" if bundled else "unbundled", dtype, ckpt.root.name,
                               progress=progress)
        write_stamp(d)
        return d
    d = FlashDir.open(root)
    total = sum(e["bytes"] for e in _files(d))
    check_flash(d, full=verify or total < FULL_CHECK_BELOW, progress=progress)
    return d


def _files(d: FlashDir) -> list[dict[str, Any]]:
    return d.manifest["files"]


def write_stamp(d: FlashDir) -> None:
    """Record each file's size and mtime with the sha256 it was just written or checked with."""
    stamp = {}
    for e in _files(d):
        st = (d.root / e["name"]).stat()
        stamp[e["name"]] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": e["sha256"]}
    tmp = d.root / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, d.root / STAMP)


def check_flash(d: FlashDir, full: bool = False, progress: bool = False) -> list[str]:
    """Check a flash directory before it is used; raise FlashDirError naming a changed file and the fix.

    Cheap (default): ``FlashDir.open`` has checked the manifest and every file's size; here every file whose
    size or mtime differs from the stamp written when it was last hashed is re-hashed against the manifest's
    sha256 (a byte flipped through the filesystem changes the mtime, so it is caught here, before generation
    starts). ``full`` (``--verify``): re-hash every file, whatever its mtime says (catches changes that kept
    the mtime, e.g. a restored timestamp or bit rot). Returns the names it re-hashed."""
    try:
        stamp = json.loads((d.root / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        stamp = {}
    fix = (f"delete {d.root} (or run python -m real.generate with --reconvert) so the checkpoint is converted "
           "again")
    todo = []
    for e in _files(d):
        st = (d.root / e["name"]).stat()
        s = stamp.get(e["name"])
        if full or s is None or s.get("sha256") != e["sha256"] or s.get("bytes") != st.st_size \
                or s.get("mtime_ns") != st.st_mtime_ns:
            todo.append(e)
    it = todo
    if progress and todo:
        from tqdm import tqdm
        it = tqdm(todo, desc="verify flash files", unit="file", leave=False)
    for e in it:
        p = d.root / e["name"]
        digest = sha256_file(p)
        if digest != e["sha256"]:
            raise FlashDirError(str(p), f"was changed after conversion: sha256 {digest[:16]}... but the manifest says "
                                f"{e['sha256'][:16]}...", fix)
    if todo:
        write_stamp(d)
    return [e["name"] for e in todo]


# ---- random-init checkpoints in the standard layout (scripts/build_checkpoint.py) --------------------------
def hf_config(spec: ModelSpec, max_positions: int = 2048):
    """A transformers config of ``spec``'s geometry: ``OPTConfig`` for 2 FFN matrices (OPT), ``LlamaConfig``
    with ``hidden_act=relu`` for 3 (a ReLU-fied Llama); the values a public checkpoint of that family has
    elsewhere (OPT: pre-norm, learned positions, pad 1 / bos 2 / eos 2; Llama: RMSNorm eps 1e-5)."""
    require(spec.hf_architecture in ("OPTForCausalLM", "LlamaForCausalLM"), "--model",
            f"{spec.name} is a {spec.hf_architecture or '?'} preset; random checkpoints are built for OPT and Llama "
            "presets", "use an OPT preset (opt-tiny, opt-small, opt-6.7b) or llama-2-7b")
    require(spec.activation == "relu", "--model", f"{spec.name}'s activation is {spec.activation}",
            "use a ReLU preset")
    if spec.hf_architecture == "OPTForCausalLM":
        from transformers import OPTConfig
        require(spec.n_kv_heads in (0, spec.n_heads), "--model", "OPT has no grouped-query attention",
                "set n_kv_heads=0")
        cfg = OPTConfig(vocab_size=spec.vocab, hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
                        ffn_dim=spec.d_ff, num_attention_heads=spec.n_heads, max_position_embeddings=max_positions,
                        word_embed_proj_dim=spec.d_model, do_layer_norm_before=True, activation_function="relu",
                        enable_bias=True, tie_word_embeddings=spec.tied_embeddings, init_std=0.02,
                        pad_token_id=1, bos_token_id=2, eos_token_id=2)
        cfg.architectures = ["OPTForCausalLM"]
    else:
        from transformers import LlamaConfig
        cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
                          num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                          num_key_value_heads=spec.kv_heads, hidden_act="relu", max_position_embeddings=max_positions,
                          rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=spec.tied_embeddings,
                          bos_token_id=1, eos_token_id=2)
        cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = spec.dtype
    return cfg


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` writes for ``config`` (tied ``lm_head`` left out), in
    the model's order: from the model built on the ``meta`` device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]


def _init_tensor(name: str, shape: tuple[int, ...], dtype, seed: int, index: int, std: float, pad: int | None):
    """HF's initialisation, drawn per tensor from its own seeded generator: linear and embedding weights
    N(0, std), biases 0, norm weights 1 (the padding row of the token embedding 0)."""
    import torch

    if len(shape) == 1:
        return (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    t = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)
    if pad is not None and name.endswith("embed_tokens.weight") and 0 <= pad < shape[0]:
        t[pad] = 0
    return t


def build_random_checkpoint(spec: ModelSpec, out: str | Path, shard_bytes: int = 5 << 30, seed: int = 0,
                            force: bool = False, progress: bool = True) -> Path:
    """Write a random-init checkpoint of ``spec`` to ``out`` in the Hugging Face layout: ``config.json`` (from
    ``hf_config``), ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` of at most
    ``shard_bytes`` + ``model.safetensors.index.json``, as ``save_pretrained`` lays them out. Weights are drawn
    tensor by tensor and streamed into the shards (memory: one tensor; OPT-6.7B fp16 is 13.3 GB on disk).
    config.json is written last: a directory without it is an interrupted build. An existing complete build
    of the same config is kept (``force`` rebuilds it)."""
    import shutil

    import torch
    from real.flash_dir import TensorEntry, write_safetensors

    out = Path(out).expanduser()
    config = hf_config(spec)
    cfg_json = config.to_json_string(use_diff=False)
    tensors = checkpoint_tensors(config)
    dtype = getattr(torch, spec.dtype)
    item = torch.empty(0, dtype=dtype).element_size()
    sizes = [int(np.prod(s, dtype=np.int64)) * item for _, s in tensors]
    total = sum(sizes)
    if not force and (out / "config.json").exists():
        strip = lambda c: {k: v for k, v in c.items() if k != "transformers_version"}  # noqa: E731
        try:
            ckpt = Checkpoint.open(out, model_mode=False)
            if strip(ckpt.config) == strip(json.loads(cfg_json)) and set(ckpt.names) == {n for n, _ in tensors}:
                return out                     # already built: same config, every tensor there
        except ConfigError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    require(free > total * 1.02, "--out", f"{out} has {free / 1e9:.1f} GB free, the checkpoint needs {total / 1e9:.1f} GB",
            "choose a disk with more room (--out)")
    for old in [out / "config.json", out / INDEX, *out.glob("model*.safetensors")]:
        old.unlink(missing_ok=True)
    shards: list[list[int]] = [[]]
    acc = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and acc + nbytes > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(i)
        acc += nbytes
    names = [SINGLE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for k in range(len(shards))]
    pad = getattr(config, "pad_token_id", None)
    std = float(getattr(config, "init_std", None) or getattr(config, "initializer_range", 0.02))
    st_code = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[spec.dtype]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"build {spec.name} ({spec.dtype})", unit="B", unit_scale=True)
    weight_map = {}
    for fname, idx in zip(names, shards):
        entries = []
        for i in idx:
            name, shape = tensors[i]
            weight_map[name] = fname

            def produce(name=name, shape=shape, i=i):
                t = _init_tensor(name, shape, dtype, seed, i, std, pad)
                yield t.contiguous().view(torch.uint8).numpy().reshape(-1)
                if bar is not None:
                    bar.update(sizes[i])
            entries.append(TensorEntry(name, st_code, shape, produce))
        write_safetensors(out / fname, entries, {"format": "pt"})
    if bar is not None:
        bar.close()
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(cfg_json)
    return out
