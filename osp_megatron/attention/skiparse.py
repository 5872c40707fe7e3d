"""Skiparse-2D attention: the (t, h, w) token grid split into P^2 interleaved subsequences, each attended densely.

Layout helpers move any per-token tensor between row-major order and the sparse layout [B*P^2, Np/P^2, ...].

Notation (docs/skiparse.md). H and W are zero-padded up to Hp, Wp, multiples of P^2, and every padded
position is written h = P^2*a + P*p + r, w = P^2*b + P*q + s with 0 <= p, q, r, s < P.
  token pattern: subsequence r*P + s, its tokens ordered by (t, a, p, b, q)  (stride-P sampling)
  group pattern: subsequence p*P + q, its tokens ordered by (t, a, r, b, s)  (P x P patches, P^2 apart)
Both keep row-major (t, h, w) order inside a subsequence, and the two layouts differ by swapping the
(p, q) and (r, s) axes. A sparse tensor has shape [B*P^2, Np/P^2, *rest] with Np = T*Hp*Wp and row
b*P^2 + subsequence; `rest` is any trailing shape, so hidden states, q/k/v, RoPE tables and masks all move
with the same functions.
"""

import torch
import torch.nn.functional as F

from osp_megatron.attention.dispatch import dot_product_attention

PATTERNS = ("token", "group")

# Axis orders of the padded grid viewed as [B, T, A, p, r, Bw, q, s] that give the sparse layouts
# [B, subsequence rows, subsequence cols, T, ...in-subsequence row-major axes...].
_SPARSE_AXES = {
    "token": (0, 4, 7, 1, 2, 3, 5, 6),  # [B, r, s, T, A, p, Bw, q]
    "group": (0, 3, 6, 1, 2, 4, 5, 7),  # [B, p, q, T, A, r, Bw, s]
}
_FULL_AXES = {pattern: tuple(sorted(range(8), key=axes.__getitem__)) for pattern, axes in _SPARSE_AXES.items()}
# Token and group layouts differ by swapping axes 1<->5 and 2<->7 of the 8-axis sparse view.
_SWITCH_AXES = (0, 5, 7, 3, 4, 1, 6, 2)


def _check_pattern(pattern):
    if pattern not in PATTERNS:
        raise ValueError(f"Skiparse pattern must be one of {PATTERNS}, got {pattern!r}")


def _check_sparse_ratio(sparse_ratio):
    if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, int) or sparse_ratio < 1:
        raise ValueError(f"Skiparse sparse ratio P must be an integer >= 1, got {sparse_ratio!r}")


def _check_grid(grid):
    if len(grid) != 3 or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in grid):
        raise ValueError(f"token grid must be three positive integers (T, H, W), got {grid!r}")
    return tuple(grid)


def padded_grid(grid, sparse_ratio):
    """(T, Hp, Wp): H and W rounded up to multiples of P^2; time is never split, so T is kept."""
    frames, height, width = _check_grid(grid)
    _check_sparse_ratio(sparse_ratio)
    block = sparse_ratio * sparse_ratio
    return frames, -(-height // block) * block, -(-width // block) * block


def _sparse_view_shape(grid, sparse_ratio):
    """[T, A, p, r, Bw, q, s] sizes of the padded grid (after the batch axis)."""
    frames, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    block = sparse_ratio * sparse_ratio
    ratio = sparse_ratio
    return frames, padded_height // block, ratio, ratio, padded_width // block, ratio, ratio


def _num_tokens(grid):
    frames, height, width = grid
    return frames * height * width


def _check_full(x, grid, name):
    if x.dim() < 2 or x.shape[1] != _num_tokens(grid):
        raise ValueError(
            f"{name}: expected [batch, {_num_tokens(grid)} tokens, ...] for grid {tuple(grid)}, "
            f"got shape {tuple(x.shape)}"
        )


def _sparse_batch(x, grid, sparse_ratio, name):
    """Batch size B of a sparse-layout tensor, after checking its first two dims fit the grid."""
    frames, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    num_subsequences = sparse_ratio * sparse_ratio
    subsequence_length = frames * padded_height * padded_width // num_subsequences
    if x.dim() < 2 or x.shape[0] % num_subsequences or x.shape[1] != subsequence_length:
        raise ValueError(
            f"{name}: expected sparse layout [batch*{num_subsequences}, {subsequence_length}, ...] for grid "
            f"{tuple(grid)} and P={sparse_ratio}, got shape {tuple(x.shape)}"
        )
    return x.shape[0] // num_subsequences


def to_sparse_layout(x, grid, sparse_ratio, pattern):
    """Full row-major [B, T*H*W, *rest] -> sparse layout [B*P^2, Np/P^2, *rest], zero-padding H and W."""
    _check_pattern(pattern)
    _check_sparse_ratio(sparse_ratio)
    grid = _check_grid(grid)
    _check_full(x, grid, "to_sparse_layout")
    frames, height, width = grid
    _, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    batch, rest = x.shape[0], x.shape[2:]
    x = x.reshape(batch, frames, height, width, *rest)
    if (padded_height, padded_width) != (height, width):
        # F.pad lists (before, after) pairs starting from the last dim; trailing dims get none.
        x = F.pad(x, [0, 0] * len(rest) + [0, padded_width - width, 0, padded_height - height])
    x = x.reshape(batch, *_sparse_view_shape(grid, sparse_ratio), *rest)
    trailing = tuple(range(8, 8 + len(rest)))
    x = x.permute(*_SPARSE_AXES[pattern], *trailing)
    return x.reshape(batch * sparse_ratio**2, -1, *rest)


def from_sparse_layout(x, grid, sparse_ratio, pattern):
    """Sparse layout [B*P^2, Np/P^2, *rest] -> full row-major [B, T*H*W, *rest], cropping the padding."""
    _check_pattern(pattern)
    grid = _check_grid(grid)
    batch = _sparse_batch(x, grid, sparse_ratio, "from_sparse_layout")
    frames, height, width = grid
    _, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    rest = x.shape[2:]
    view_shape = _sparse_view_shape(grid, sparse_ratio)
    sparse_shape = [view_shape[axis - 1] for axis in _SPARSE_AXES[pattern][1:]]
    x = x.reshape(batch, *sparse_shape, *rest)
    trailing = tuple(range(8, 8 + len(rest)))
    x = x.permute(*_FULL_AXES[pattern], *trailing).reshape(batch, frames, padded_height, padded_width, *rest)
    if (padded_height, padded_width) != (height, width):
        x = x[:, :, :height, :width]
    return x.reshape(batch, frames * height * width, *rest)


def switch_sparse_pattern(x, grid, sparse_ratio):
    """Token <-> group pattern of a sparse-layout tensor; the permutation is its own inverse."""
    grid = _check_grid(grid)
    batch = _sparse_batch(x, grid, sparse_ratio, "switch_sparse_pattern")
    frames, num_a, ratio, _, num_b, _, _ = _sparse_view_shape(grid, sparse_ratio)
    rest = x.shape[2:]
    # Token and group views have identical axis sizes, so one reshape serves both directions.
    x = x.reshape(batch, ratio, ratio, frames, num_a, ratio, num_b, ratio, *rest)
    trailing = tuple(range(8, 8 + len(rest)))
    return x.permute(*_SWITCH_AXES, *trailing).reshape(x.shape[0] * ratio * ratio, -1, *rest)


def sparse_key_mask(grid, sparse_ratio, pattern, device=None):
    """Bool [P^2, Np/P^2] in the sparse layout: True for real tokens, False for the zero padding."""
    grid = _check_grid(grid)
    real_tokens = torch.ones(1, _num_tokens(grid), dtype=torch.bool, device=device)
    return to_sparse_layout(real_tokens, grid, sparse_ratio, pattern)


def _subsequence_of_each_token(grid, sparse_ratio, pattern, device=None):
    """Long [T*H*W]: the subsequence index of every row-major token, from the pattern's defining formula."""
    frames, height, width = _check_grid(grid)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    if pattern == "token":
        row_part, col_part = rows % sparse_ratio, cols % sparse_ratio
    else:
        row_part = (rows % sparse_ratio**2) // sparse_ratio
        col_part = (cols % sparse_ratio**2) // sparse_ratio
    per_frame = row_part[:, None] * sparse_ratio + col_part[None, :]
    return per_frame.expand(frames, height, width).reshape(-1)


def skiparse_dense_mask(grid, sparse_ratio, pattern, device=None):
    """Reference bool [N, N]: entry (i, j) is True when query i may attend key j (same subsequence).

    Built from the index formulas rather than the layout permutations, so tests can check one against
    the other. Materialises N^2 booleans: for small grids only.
    """
    _check_pattern(pattern)
    _check_sparse_ratio(sparse_ratio)
    subsequence = _subsequence_of_each_token(grid, sparse_ratio, pattern, device)
    return subsequence[:, None] == subsequence[None, :]


def real_key_runs(key_mask):
    """Consecutive subsequences that share one set of real key positions, for attention without masks.

    key_mask bool [M, L] -> list of (start, stop, key_index) where key_index is None when every key of the
    run is real, else the long indices of the real keys (empty when the run is all padding). Padded keys
    are then removed instead of masked, so the mask-free (fastest) kernels run even on padded grids.
    """
    runs = []
    for row in range(key_mask.shape[0]):
        index = key_mask[row].nonzero().flatten()
        index = None if index.numel() == key_mask.shape[1] else index
        if runs:
            start, stop, previous = runs[-1]
            same = (previous is None and index is None) or (
                previous is not None and index is not None and torch.equal(previous, index)
            )
            if same:
                runs[-1] = (start, row + 1, previous)
                continue
        runs.append((row, row + 1, index))
    return runs


def skiparse_attention_sparse_layout(q, k, v, key_mask=None, backend="auto", key_runs=None):
    """Dense attention inside each subsequence for q, k, v already in the sparse layout [B*M, L, heads, dim].

    key_mask: None when no subsequence holds padding, else bool [M, L] (True = real token) for the M
    subsequences held here, sparse row b*M + m using mask row m; M is P^2 without sequence parallelism
    (sparse_key_mask gives it) and the locally held subsequences' rows with it. `key_runs` (from
    real_key_runs(key_mask), computed once per layout) skips the per-call grouping.
    """
    if key_mask is None and key_runs is None:
        return dot_product_attention(q, k, v, backend=backend)
    if key_runs is None:
        if key_mask.dim() != 2 or q.shape[0] % key_mask.shape[0]:
            raise ValueError(
                f"key_mask {tuple(key_mask.shape)} must have a row count dividing the sparse batch {q.shape[0]}"
            )
        key_runs = real_key_runs(key_mask)
    held = key_runs[-1][1]
    if q.shape[0] % held:
        raise ValueError(f"sparse batch {q.shape[0]} is not a multiple of the {held} subsequences of key_runs")
    q5, k5, v5 = (t.reshape(t.shape[0] // held, held, *t.shape[1:]) for t in (q, k, v))
    outputs = []
    for start, stop, index in key_runs:
        q_run, k_run, v_run = (t[:, start:stop].flatten(0, 1) for t in (q5, k5, v5))
        if index is not None and index.numel() == 0:
            # Only padding here: the output is zero, but it stays a function of q, k and v, so that every
            # projection gets a (zero) gradient on every rank. A rank whose subsequences are all padding would
            # otherwise leave them without one, and the gradient reduction (FSDP's reduce-scatter or the
            # replicated all-reduce) would see other tensors on that rank than on the others.
            outputs.append((q5[:, start:stop] + k5[:, start:stop] + v5[:, start:stop]) * 0)
            continue
        if index is not None:
            k_run, v_run = k_run.index_select(1, index), v_run.index_select(1, index)
        out = dot_product_attention(q_run, k_run, v_run, backend=backend)
        outputs.append(out.unflatten(0, (q5.shape[0], stop - start)))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out.reshape(q.shape)


def skiparse_attention(q, k, v, grid, pattern, sparse_ratio, backend="auto"):
    """Skiparse-2D self-attention on row-major q, k, v [B, T*H*W, heads, head_dim] -> same shape.

    Equals dense attention in which each query sees exactly the real keys of its own subsequence.
    P = 1 is plain full attention. Keys of the zero padding are masked; when the grid needs no padding
    no mask is passed, so the fastest mask-free kernels apply.
    """
    _check_pattern(pattern)
    _check_sparse_ratio(sparse_ratio)
    grid = _check_grid(grid)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 4:
            raise ValueError(
                f"skiparse_attention: {name} must be [batch, tokens, heads, head_dim], got {tuple(tensor.shape)}"
            )
        _check_full(tensor, grid, f"skiparse_attention ({name})")
    if sparse_ratio == 1:
        return dot_product_attention(q, k, v, backend=backend)
    key_mask = None
    if padded_grid(grid, sparse_ratio) != grid:
        key_mask = sparse_key_mask(grid, sparse_ratio, pattern, device=q.device)
    q, k, v = (to_sparse_layout(tensor, grid, sparse_ratio, pattern) for tensor in (q, k, v))
    out = skiparse_attention_sparse_layout(q, k, v, key_mask, backend)
    return from_sparse_layout(out, grid, sparse_ratio, pattern)
