"""ModelSpec: the geometry of a decoder-only transformer, enough to size every read and every op."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sim.errors import reject_unknown, require
from sim.presets import load_preset

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
ACTIVATIONS = ("relu", "relu2")  # the flash method needs exact zeros: ReLU or squared ReLU


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    vocab: int
    n_kv_heads: int = 0          # 0 means "same as n_heads" (no grouped/multi-query attention)
    dtype: str = "float16"
    activation: str = "relu"
    ffn_matrices: int = 2         # 2: up + down (OPT, Falcon, Phi); 3: gate + up + down (Llama)
    tied_embeddings: bool = True
    original_activation: str = ""  # what the public checkpoint uses, where the preset is ReLU-fied
    hf_architecture: str = ""

    def __post_init__(self) -> None:
        for f in ("n_layers", "d_model", "d_ff", "n_heads", "vocab"):
            v = getattr(self, f)
            require(isinstance(v, int) and v > 0, f"model.{f}", f"must be a positive integer, got {v!r}",
                    f"set model.{f} to the checkpoint's value (e.g. model.{f}=32)")
        require(self.d_model % self.n_heads == 0, "model.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                "use the checkpoint's head count")
        require(0 <= self.n_kv_heads <= self.n_heads and (self.n_kv_heads == 0 or self.n_heads % self.n_kv_heads == 0),
                "model.n_kv_heads", f"must be 0 or a divisor of n_heads={self.n_heads}, got {self.n_kv_heads}",
                "use 0 for plain multi-head attention, or the checkpoint's key/value head count")
        require(self.dtype in DTYPE_BYTES, "model.dtype", f"unknown dtype {self.dtype!r}",
                f"use one of {sorted(DTYPE_BYTES)}")
        require(self.activation in ACTIVATIONS, "model.activation",
                f"{self.activation!r} gives no exact zeros, so sparsity cannot be exploited",
                f"use a ReLU-fied model: one of {ACTIVATIONS}")
        require(self.ffn_matrices in (2, 3), "model.ffn_matrices", f"must be 2 or 3, got {self.ffn_matrices}",
                "2 for up/down FFNs (OPT), 3 for gated FFNs (Llama)")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        return cls.from_dict(load_preset("model", name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        reject_unknown(cls, data, "model", "ModelSpec field")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def neuron_bytes(self) -> int:
        """Bytes of one FFN neuron: its up (and gate) column plus its down row."""
        return self.ffn_matrices * self.d_model * self.dtype_bytes

    @property
    def ffn_layer_bytes(self) -> int:
        return self.d_ff * self.neuron_bytes

    @property
    def ffn_bytes(self) -> int:
        return self.n_layers * self.ffn_layer_bytes

    @property
    def attention_layer_bytes(self) -> int:
        kv = 2 * self.d_model * self.kv_heads * self.head_dim
        return (2 * self.d_model * self.d_model + kv) * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        return self.vocab * self.d_model * self.dtype_bytes * (1 if self.tied_embeddings else 2)

    @property
    def non_ffn_bytes(self) -> int:
        """What always stays in memory: attention, embeddings (norms and biases are negligible)."""
        return self.n_layers * self.attention_layer_bytes + self.embedding_bytes

    @property
    def total_bytes(self) -> int:
        return self.ffn_bytes + self.non_ffn_bytes
