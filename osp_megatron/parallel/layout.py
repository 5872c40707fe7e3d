"""Where a rank's tokens sit between blocks: full row-major order or a Skiparse (token/group) layout.

The model calls `enter`, `switch` and `exit` at pattern changes only, so consecutive sparse blocks keep the
sparse layout; RoPE tables and key masks follow the same permutation as the hidden states.
"""

import functools

import torch

from osp_megatron.attention.skiparse import (
    from_sparse_layout,
    real_key_runs,
    sparse_key_mask,
    switch_sparse_pattern,
    to_sparse_layout,
)
from osp_megatron.models.rope import rope_tables
from osp_megatron.models.wan.layers import AttentionContext

SPARSE_KINDS = ("token", "group")


def key_runs_on(key_mask: torch.Tensor, device):
    """real_key_runs of a bool [subsequences, L] key mask with indices on `device`; None when none is padded."""
    if bool(key_mask.all()):
        return None
    return [(start, stop, None if index is None else index.to(device))
            for start, stop, index in real_key_runs(key_mask)]


@functools.lru_cache(maxsize=16)
def _sparse_tables(grid, ratio: int, head_dim: int, theta: float, device, kind: str):
    """(RoPE cos/sin in layout `kind` [1, N_local, 1, head_dim], key runs) for one grid, built once.

    A layout object lives for one forward pass; caching here keeps the permuted tables and the host-side
    key-run scan out of every training step.
    """
    cos, sin = (to_sparse_layout(t, grid, ratio, kind) for t in rope_tables(grid, head_dim, theta, device))
    rope = (cos.reshape(1, -1, *cos.shape[2:]), sin.reshape(1, -1, *sin.shape[2:]))
    return rope, key_runs_on(sparse_key_mask(grid, ratio, kind, "cpu"), device)


class LocalTokenLayout:
    """All tokens of each sample on this rank (no sequence parallelism).

    Hidden states are always [B, N_local, dim]; in a sparse kind the N_local tokens are P^2 equal runs
    (one per subsequence, padded grid), which only the self-attention core needs to know.
    """

    def __init__(self, grid, sparse_ratio: int, head_dim: int, rope_theta: float, device, backend="auto"):
        self.grid, self.ratio, self.device, self.backend = tuple(grid), sparse_ratio, device, backend
        self.head_dim, self.theta = head_dim, rope_theta
        self._full_rope = rope_tables(self.grid, head_dim, rope_theta, device)

    # -- token order -----------------------------------------------------------------------------------
    def _to_kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Full row-major [B, N, ...] -> layout `kind` [B, N_local, ...]."""
        if kind == "full":
            return x
        sparse = to_sparse_layout(x, self.grid, self.ratio, kind)
        return sparse.reshape(x.shape[0], -1, *sparse.shape[2:])

    def _from_kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "full":
            return x
        count = self.ratio**2
        sparse = x.reshape(x.shape[0] * count, -1, *x.shape[2:])
        return from_sparse_layout(sparse, self.grid, self.ratio, kind)

    def enter(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Hidden states straight after the patch embedding -> layout of the first block."""
        return self._to_kind(x, kind)

    def switch(self, x: torch.Tensor, from_kind: str, to_kind: str) -> torch.Tensor:
        if from_kind == to_kind:
            return x
        if from_kind in SPARSE_KINDS and to_kind in SPARSE_KINDS:
            count = self.ratio**2
            sparse = x.reshape(x.shape[0] * count, -1, *x.shape[2:])
            return switch_sparse_pattern(sparse, self.grid, self.ratio).reshape(x.shape)
        return self._to_kind(self._from_kind(x, from_kind), to_kind)

    def exit(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Layout of the last block -> full row-major [B, T*H*W, dim] for the output head."""
        return self._from_kind(x, kind)

    # -- per-layout side tables ------------------------------------------------------------------------
    def _tables(self, kind: str):
        return _sparse_tables(self.grid, self.ratio, self.head_dim, self.theta, self.device, kind)

    def rope(self, kind: str):
        return self._full_rope if kind == "full" else self._tables(kind)[0]

    def attention_context(self, kind: str) -> AttentionContext:
        if kind == "full":
            return AttentionContext(backend=self.backend)
        return AttentionContext(subsequences=self.ratio**2, key_runs=self._tables(kind)[1], backend=self.backend)
