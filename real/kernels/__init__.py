"""Fused Triton kernels of the real backend, each beside its plain-torch reference.

Every function dispatches on its input: compiled Triton for CUDA tensors, the Triton interpreter for CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported (tests), else the torch reference (so the
backend runs on CPU). Pass impl='torch' to force the reference, impl='triton' to demand a kernel.
See docs/kernels.md.
"""

from real.kernels._launch import backend_for, interpreting
from real.kernels.add_norm import add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference
from real.kernels.predictor import (active_list, predict_active, predict_active_reference,
                                    predict_scores_reference)
from real.kernels.sparse_ffn import bundled_sparse_ffn, sparse_ffn, sparse_ffn_reference, split_bundles

__all__ = [
    "backend_for", "interpreting",
    "sparse_ffn", "bundled_sparse_ffn", "split_bundles", "sparse_ffn_reference",
    "predict_active", "active_list", "predict_active_reference", "predict_scores_reference",
    "add_layer_norm", "add_rms_norm", "add_layer_norm_reference", "add_rms_norm_reference",
]
