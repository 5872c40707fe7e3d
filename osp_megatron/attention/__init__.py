"""Attention kernels and layouts: one dispatching dot-product attention and Skiparse-2D sparse attention.

Model code imports from here; which kernel runs is decided in dispatch, the sparse layout in skiparse.
"""

from osp_megatron.attention.dispatch import (
    BACKENDS,
    AttentionBackendUnavailableError,
    dot_product_attention,
    dot_product_attention_varlen,
)
from osp_megatron.attention.skiparse import (
    PATTERNS,
    from_sparse_layout,
    padded_grid,
    real_key_runs,
    skiparse_attention,
    skiparse_attention_sparse_layout,
    skiparse_dense_mask,
    sparse_key_mask,
    switch_sparse_pattern,
    to_sparse_layout,
)

__all__ = [
    "BACKENDS",
    "PATTERNS",
    "AttentionBackendUnavailableError",
    "dot_product_attention",
    "dot_product_attention_varlen",
    "from_sparse_layout",
    "padded_grid",
    "real_key_runs",
    "skiparse_attention",
    "skiparse_attention_sparse_layout",
    "skiparse_dense_mask",
    "sparse_key_mask",
    "switch_sparse_pattern",
    "to_sparse_layout",
]
