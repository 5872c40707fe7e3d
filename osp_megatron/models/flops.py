"""Model FLOPs of the DiT (matrix multiplications only, 2 per multiply-add) for throughput reporting.

Sparse blocks attend to 1/P^2 of the keys; activation recomputation is not counted (model FLOPs, not hardware).
"""

import math

from osp_megatron.models.config import ModelConfig


def forward_flops(model: ModelConfig, grid, text_len: int | None = None) -> float:
    """FLOPs of one forward pass of one sample on a (T, H, W) token grid."""
    tokens = math.prod(grid)
    dim, ffn, text = model.dim, model.ffn_dim, text_len or model.text_len
    patch_volume = math.prod(model.patch_size)
    total = 2 * tokens * dim * model.in_channels * patch_volume  # patch embedding
    total += 2 * text * (model.text_dim * dim + dim * dim)  # text embedding
    total += 2 * tokens * dim * model.out_channels * patch_volume  # output head
    for kind in model.block_kinds():
        keys = tokens if kind == "full" else tokens / model.sparse_ratio**2
        total += 8 * tokens * dim * dim + 4 * tokens * keys * dim  # self-attention
        total += 4 * tokens * dim * dim + 4 * text * dim * dim + 4 * tokens * text * dim  # cross-attention
        total += 4 * tokens * dim * ffn  # feed-forward
    return float(total)


def training_flops(model: ModelConfig, grid, text_len: int | None = None) -> float:
    """Forward plus backward (twice the forward) of one sample."""
    return 3.0 * forward_flops(model, grid, text_len)
