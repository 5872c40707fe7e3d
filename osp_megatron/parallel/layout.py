"""Where a rank's tokens sit between blocks: full row-major order or a Skiparse (token/group) layout.

The model calls `enter`, `switch` and `exit` at pattern changes only, so consecutive sparse blocks keep the
sparse layout; RoPE tables and key masks follow the same permutation as the hidden states.
"""

import functools
import math

import torch

from osp_megatron.attention.context import AttentionContext
from osp_megatron.attention.rope import rope_tables
from osp_megatron.attention.skiparse import (
    from_sparse_layout,
    padded_grid,
    real_key_runs,
    switch_sparse_pattern,
    to_sparse_layout,
)
from osp_megatron.utils.compile import accelerator_compiled

SPARSE_KINDS = ("token", "group")

# The hidden-state moves compiled on accelerators: one tiled copy kernel per move (and per gradient) instead
# of PyTorch's generic strided copy, which runs these 8-axis permutations at a fraction of memory bandwidth.
_enter_sparse = accelerator_compiled(to_sparse_layout)
_leave_sparse = accelerator_compiled(from_sparse_layout)
_switch_sparse = accelerator_compiled(switch_sparse_pattern)


def key_runs_on(key_mask: torch.Tensor, device):
    """real_key_runs of a bool [subsequences, L] key mask with indices on `device`; None when none is padded."""
    if bool(key_mask.all()):
        return None
    return [
        (start, stop, None if index is None else index.to(device)) for start, stop, index in real_key_runs(key_mask)
    ]


@functools.lru_cache(maxsize=16)
def _sparse_rope(grid, ratio: int, head_dim: int, theta: float, device, kind: str):
    """RoPE cos/sin in layout `kind` [1, N, 1, head_dim] of a grid that needs no padding, built once.

    A layout object lives for one forward pass; caching here keeps the permuted tables out of every step.
    """
    cos, sin = (to_sparse_layout(t, grid, ratio, kind) for t in rope_tables(grid, head_dim, theta, device))
    return cos.reshape(1, -1, *cos.shape[2:]), sin.reshape(1, -1, *sin.shape[2:])


def _gather_tokens(x, index):
    return x.index_select(1, index)


_gather_tokens_fused = accelerator_compiled(_gather_tokens)


class PermuteTokens(torch.autograd.Function):
    """x[:, index] for a permutation `index`; the gradient is the gather by the inverse permutation.

    A plain x[:, index] would scatter-add its gradient; a permutation needs only the inverse gather.
    """

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _gather_tokens_fused(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_tokens_fused(grad.contiguous(), inverse), None, None


@functools.lru_cache(maxsize=16)
def _packed_tables(grid, ratio: int, head_dim: int, theta: float, device):
    """Orders of the packed sparse layouts of a grid that needs padding, built once per grid.

    Returns {kind: (order, inverse, lengths, rope)}: `order` lists the row-major index of every real token
    in the kind's sparse order (subsequence after subsequence, padding left out), `inverse` maps back,
    `lengths` are the subsequences' token counts, `rope` the RoPE tables in that order.
    """
    tokens = math.prod(grid)
    ids = torch.arange(1, tokens + 1).reshape(1, tokens)  # 0 is the padding to_sparse_layout inserts
    cos, sin = rope_tables(grid, head_dim, theta, device)
    tables = {}
    for kind in SPARSE_KINDS:
        rows = [row[row > 0] - 1 for row in to_sparse_layout(ids, grid, ratio, kind)]
        order = torch.cat(rows)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(tokens)
        order, inverse = order.to(device), inverse.to(device)
        rope = (cos.index_select(1, order), sin.index_select(1, order))
        tables[kind] = (order, inverse, tuple(len(row) for row in rows), rope)
    return tables


@functools.lru_cache(maxsize=16)
def _packed_switch(grid, ratio: int, head_dim: int, theta: float, device, source: str, target: str):
    """(index, inverse) moving packed hidden states from pattern `source` to pattern `target`."""
    tables = _packed_tables(grid, ratio, head_dim, theta, device)
    (source_order, source_inverse), (target_order, target_inverse) = tables[source][:2], tables[target][:2]
    # position in the source order of each token of the target order, and back
    return source_inverse[target_order], target_inverse[source_order]


class LocalTokenLayout:
    """All tokens of each sample on this rank (no sequence parallelism).

    Hidden states are always [B, N_local, dim]; in a sparse kind the N_local tokens are the P^2
    subsequences one after another, which only the self-attention core needs to know. When H or W is not
    a multiple of P^2 the layout is packed: the real tokens are permuted (no padding tokens, so the GEMMs
    and element-wise work of sparse blocks stay at N tokens) and subsequences differ in length by a row
    or column; otherwise it is skiparse.to_sparse_layout's reshape and permute (nothing to drop).
    """

    def __init__(self, grid, sparse_ratio: int, head_dim: int, rope_theta: float, device, backend="auto"):
        self.grid, self.ratio, self.device, self.backend = tuple(grid), sparse_ratio, device, backend
        self.head_dim, self.theta = head_dim, rope_theta
        self._full_rope = rope_tables(self.grid, head_dim, rope_theta, device)
        self.packed = sparse_ratio > 1 and padded_grid(self.grid, sparse_ratio) != self.grid

    def _packed(self, kind: str):
        return _packed_tables(self.grid, self.ratio, self.head_dim, self.theta, self.device)[kind]

    # -- token order -----------------------------------------------------------------------------------
    def _to_kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Full row-major [B, N, ...] -> layout `kind` [B, N_local, ...]."""
        if kind == "full":
            return x
        if self.packed:
            order, inverse = self._packed(kind)[:2]
            return PermuteTokens.apply(x, order, inverse)
        sparse = _enter_sparse(x, self.grid, self.ratio, kind)
        return sparse.reshape(x.shape[0], -1, *sparse.shape[2:])

    def _from_kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "full":
            return x
        if self.packed:
            order, inverse = self._packed(kind)[:2]
            return PermuteTokens.apply(x, inverse, order)
        count = self.ratio**2
        sparse = x.reshape(x.shape[0] * count, -1, *x.shape[2:])
        return _leave_sparse(sparse, self.grid, self.ratio, kind)

    def enter(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Hidden states straight after the patch embedding -> layout of the first block."""
        return self._to_kind(x, kind)

    def switch(self, x: torch.Tensor, from_kind: str, to_kind: str) -> torch.Tensor:
        if from_kind == to_kind:
            return x
        if from_kind in SPARSE_KINDS and to_kind in SPARSE_KINDS:
            if self.packed:
                return PermuteTokens.apply(
                    x,
                    *_packed_switch(self.grid, self.ratio, self.head_dim, self.theta, self.device, from_kind, to_kind),
                )
            count = self.ratio**2
            sparse = x.reshape(x.shape[0] * count, -1, *x.shape[2:])
            return _switch_sparse(sparse, self.grid, self.ratio).reshape(x.shape)
        return self._to_kind(self._from_kind(x, from_kind), to_kind)

    def exit(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Layout of the last block -> full row-major [B, T*H*W, dim] for the output head."""
        return self._from_kind(x, kind)

    # -- per-layout side tables ------------------------------------------------------------------------
    def rope(self, kind: str):
        if kind == "full":
            return self._full_rope
        if self.packed:
            return self._packed(kind)[3]
        return _sparse_rope(self.grid, self.ratio, self.head_dim, self.theta, self.device, kind)

    def attention_context(self, kind: str) -> AttentionContext:
        if kind == "full":
            return AttentionContext(backend=self.backend)
        if self.packed:
            return AttentionContext(lengths=self._packed(kind)[2], backend=self.backend)
        return AttentionContext(subsequences=self.ratio**2, backend=self.backend)
