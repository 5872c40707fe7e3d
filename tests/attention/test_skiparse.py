"""Tests of Skiparse-2D: layouts against the index formulas, and the attention op against a dense masked reference.

The reference is a float64 softmax over the mask from skiparse_dense_mask, built independently of the layouts.
"""

import math

import pytest
import torch

from osp_megatron.attention import skiparse
from osp_megatron.attention.skiparse import (
    from_sparse_layout,
    padded_grid,
    skiparse_attention,
    skiparse_attention_sparse_layout,
    skiparse_dense_mask,
    sparse_key_mask,
    switch_sparse_pattern,
    to_sparse_layout,
)

# H and W cover: multiples of P^2, neither, and grids so small that whole subsequences are padding.
GRIDS = [(2, 5, 7), (1, 4, 8), (2, 3, 2), (1, 9, 10), (3, 1, 6)]
RATIOS = [1, 2, 3]
PATTERNS = ["token", "group"]
OTHER_PATTERN = {"token": "group", "group": "token"}


def masked_attention_reference(q, k, v, mask):
    """Plain float64 softmax attention; mask [Nq, Nk] True where query i may attend key j."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def random_qkv(batch, grid, heads=2, head_dim=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = grid[0] * grid[1] * grid[2]
    shape = (batch, num_tokens, heads, head_dim)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


def token_coordinates(grid):
    """Long [1, N, 3]: the (t, h, w) of each row-major token, to follow tokens through a layout."""
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(1, -1, 3)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparse_ratio", RATIOS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_attention_and_gradients_match_dense_masked_reference(grid, sparse_ratio, pattern):
    """skiparse_attention and its q, k, v gradients equal float64 dense attention under skiparse_dense_mask."""
    q, k, v = random_qkv(2, grid, seed=sparse_ratio)
    out = skiparse_attention(q, k, v, grid, pattern, sparse_ratio)
    expected = masked_attention_reference(q, k, v, skiparse_dense_mask(grid, sparse_ratio, pattern))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_sparse_ratio_one_is_full_attention():
    """With P = 1 there is one subsequence: the mask is all True and the output is full attention."""
    grid = (2, 3, 5)
    q, k, v = random_qkv(1, grid)
    assert skiparse_dense_mask(grid, 1, "token").all()
    out = skiparse_attention(q, k, v, grid, "group", 1)
    full = masked_attention_reference(q, k, v, torch.ones(30, 30, dtype=torch.bool))
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparse_ratio", RATIOS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_layout_places_each_token_in_its_subsequence_in_row_major_order(grid, sparse_ratio, pattern):
    """Sparse row s holds exactly the real tokens whose pattern index is s, in (t, h, w) order, then padding."""
    coordinates = token_coordinates(grid)
    linear = coordinates[..., 0] * grid[1] * grid[2] + coordinates[..., 1] * grid[2] + coordinates[..., 2]
    sparse_linear = to_sparse_layout(linear + 1, grid, sparse_ratio, pattern)  # 0 marks padding
    subsequence_of_token = skiparse._subsequence_of_each_token(grid, sparse_ratio, pattern)
    for subsequence in range(sparse_ratio**2):
        members = sparse_linear[subsequence]
        real = members[members > 0] - 1
        expected = torch.nonzero(subsequence_of_token == subsequence).flatten()
        assert torch.equal(real, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_definitions_on_coordinates(pattern):
    """Token subsequence (r, s) = {h mod P = r, w mod P = s}; group (p, q) = {floor((h mod P^2)/P) = p, ...}."""
    grid, sparse_ratio = (2, 8, 12), 2
    sparse = to_sparse_layout(token_coordinates(grid), grid, sparse_ratio, pattern)  # no padding here
    h, w = sparse[..., 1], sparse[..., 2]
    if pattern == "token":
        row_index, col_index = h % sparse_ratio, w % sparse_ratio
    else:
        row_index, col_index = (h % 4) // sparse_ratio, (w % 4) // sparse_ratio
    subsequence = torch.arange(4)[:, None]
    assert torch.equal(row_index * sparse_ratio + col_index, subsequence.expand_as(h))
    assert set(sparse[..., 0].unique().tolist()) == {0, 1}  # time is never split


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparse_ratio", RATIOS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_subsequence_count_and_sizes(grid, sparse_ratio, pattern):
    """There are P^2 subsequences of Np/P^2 slots; real sizes from the key mask match the dense mask rows."""
    frames, padded_height, padded_width = padded_grid(grid, sparse_ratio)
    key_mask = sparse_key_mask(grid, sparse_ratio, pattern)
    assert key_mask.shape == (sparse_ratio**2, frames * padded_height * padded_width // sparse_ratio**2)
    real_sizes = key_mask.sum(dim=1)
    assert real_sizes.sum() == grid[0] * grid[1] * grid[2]
    subsequence_of_token = skiparse._subsequence_of_each_token(grid, sparse_ratio, pattern)
    assert torch.equal(real_sizes, torch.bincount(subsequence_of_token, minlength=sparse_ratio**2))
    dense_mask = skiparse_dense_mask(grid, sparse_ratio, pattern)
    assert torch.equal(dense_mask.sum(dim=1), real_sizes[subsequence_of_token])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparse_ratio", RATIOS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_layout_round_trips_are_identities(grid, sparse_ratio, pattern):
    """from(to(x)) = x for hidden states, q/k/v and bool masks; switching the pattern twice is the identity."""
    num_tokens = grid[0] * grid[1] * grid[2]
    for x in (torch.randn(2, num_tokens, 6), torch.randn(3, num_tokens, 2, 4), torch.rand(2, num_tokens) > 0.5):
        sparse = to_sparse_layout(x, grid, sparse_ratio, pattern)
        assert torch.equal(from_sparse_layout(sparse, grid, sparse_ratio, pattern), x)
        switched = switch_sparse_pattern(sparse, grid, sparse_ratio)
        assert switched.shape == sparse.shape
        assert torch.equal(switch_sparse_pattern(switched, grid, sparse_ratio), sparse)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparse_ratio", [2, 3])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_switch_equals_leaving_and_reentering_the_sparse_layout(grid, sparse_ratio, pattern):
    """switch_sparse_pattern(to_sparse(x, pattern)) = to_sparse(from_sparse(..., pattern), other pattern)."""
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 3)
    sparse = to_sparse_layout(x, grid, sparse_ratio, pattern)
    full = from_sparse_layout(sparse, grid, sparse_ratio, pattern)
    via_full = to_sparse_layout(full, grid, sparse_ratio, OTHER_PATTERN[pattern])
    assert torch.equal(switch_sparse_pattern(sparse, grid, sparse_ratio), via_full)


@pytest.mark.parametrize("sparse_ratio", [2, 3])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_padded_keys_are_never_attended(sparse_ratio, pattern):
    """Changing q, k, v at padded slots of the sparse layout changes no output at a real token."""
    grid = (2, 5, 7)
    q, k, v = (to_sparse_layout(t.detach(), grid, sparse_ratio, pattern) for t in random_qkv(2, grid))
    key_mask = sparse_key_mask(grid, sparse_ratio, pattern)
    padded = ~key_mask.repeat(2, 1)[..., None, None]
    assert padded.any()
    out = skiparse_attention_sparse_layout(q, k, v, key_mask)
    noisy = [torch.where(padded, 1e3 * torch.randn_like(t), t) for t in (q, k, v)]
    noisy_out = skiparse_attention_sparse_layout(*noisy, key_mask)
    real = ~padded.expand_as(out)
    torch.testing.assert_close(noisy_out[real], out[real], rtol=0, atol=1e-12)


def test_padded_keys_are_removed_not_masked(monkeypatch):
    """No key mask ever reaches the kernel (so mask-free fast kernels apply): without padding every key is
    passed, with padding the padded keys are dropped before the call."""
    seen = []

    def recording_attention(q, k, v, key_padding_mask=None, backend="auto"):
        seen.append((key_padding_mask, q.shape[1], k.shape[1]))
        return torch.zeros_like(q)

    monkeypatch.setattr(skiparse, "dot_product_attention", recording_attention)
    for grid in [(1, 4, 8), (1, 5, 8)]:
        q, k, v = (t.detach() for t in random_qkv(1, grid))
        skiparse_attention(q, k, v, grid, "token", 2)
    assert all(mask is None for mask, _, _ in seen)
    assert seen[0][1] == seen[0][2]  # unpadded grid: one call, all keys
    assert any(keys < queries for _, queries, keys in seen[1:])


def test_subsequences_of_padding_alone_output_zero_and_pass_zero_gradients():
    """A subsequence holding only padding (a 2 x 2 grid padded to 4 x 4 leaves three of the four group
    subsequences without a real token) outputs zeros, and q, k and v still get gradients there (zeros, not
    None): under sequence parallelism a rank holding only such subsequences must hand the gradient reduction
    the same tensors as the others."""
    from osp_megatron.attention.skiparse import real_key_runs, skiparse_attention_sparse_layout, sparse_key_mask

    grid = (1, 2, 2)
    held = sparse_key_mask(grid, 2, "group")[2:]  # the subsequences an SSP rank 1 of 2 holds: padding alone
    runs = real_key_runs(held)
    assert all(index is not None and index.numel() == 0 for _, _, index in runs)
    q, k, v = (torch.randn(2, held.shape[1], 2, 8, requires_grad=True) for _ in range(3))
    out = skiparse_attention_sparse_layout(q, k, v, key_runs=runs)
    assert torch.equal(out, torch.zeros_like(out))
    out.square().sum().backward()
    assert all(t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


def test_batch_of_one_table_broadcasts_over_the_batch():
    """A [1, N, ...] RoPE-like table moves to [P^2, ...] and, viewed per batch, multiplies like the full table."""
    grid, sparse_ratio, batch = (2, 5, 6), 2, 3
    num_tokens = 60
    table = torch.randn(1, num_tokens, 1, 8)
    sparse_table = to_sparse_layout(table, grid, sparse_ratio, "group")
    assert sparse_table.shape == (sparse_ratio**2, 2 * 8 * 8 // 4, 1, 8)  # padded grid (2, 8, 8)
    q = torch.randn(batch, num_tokens, 2, 8)
    sparse_q = to_sparse_layout(q, grid, sparse_ratio, "group")
    per_batch = (sparse_q.unflatten(0, (batch, -1)) * sparse_table).flatten(0, 1)
    assert torch.equal(per_batch, to_sparse_layout(q * table, grid, sparse_ratio, "group"))


def test_padded_grid_examples():
    """720P pads H 45 -> 48 at P = 2, 768P needs no padding, P = 3 pads to multiples of 9, time never changes."""
    assert padded_grid((21, 45, 80), 2) == (21, 48, 80)
    assert padded_grid((21, 48, 80), 2) == (21, 48, 80)
    assert padded_grid((5, 10, 9), 3) == (5, 18, 9)
    assert padded_grid((3, 7, 7), 1) == (3, 7, 7)


def test_invalid_arguments_raise_value_errors_naming_the_problem():
    """Bad pattern, sparse ratio, grid, token count and sparse shape each raise a ValueError that says so."""
    grid = (1, 4, 4)
    x = torch.zeros(1, 16, 2)
    with pytest.raises(ValueError, match="pattern"):
        to_sparse_layout(x, grid, 2, "diagonal")
    with pytest.raises(ValueError, match="sparse ratio"):
        to_sparse_layout(x, grid, 0, "token")
    with pytest.raises(ValueError, match="sparse ratio"):
        padded_grid(grid, 1.5)
    with pytest.raises(ValueError, match="grid"):
        padded_grid((4, 4), 2)
    with pytest.raises(ValueError, match="16 tokens"):
        to_sparse_layout(torch.zeros(1, 15, 2), grid, 2, "token")
    with pytest.raises(ValueError, match="sparse layout"):
        from_sparse_layout(torch.zeros(3, 4, 2), grid, 2, "token")
    with pytest.raises(ValueError, match="sparse layout"):
        switch_sparse_pattern(torch.zeros(4, 5, 2), grid, 2)
    q = torch.zeros(1, 16, 2, 4)
    with pytest.raises(ValueError, match="pattern"):
        skiparse_attention(q, q, q, grid, "tokens", 2)
    with pytest.raises(ValueError, match=r"\(k\)"):
        skiparse_attention(q, q[:, :8], q, grid, "token", 2)
    with pytest.raises(ValueError, match="key_mask"):
        skiparse_attention_sparse_layout(q, q, q, torch.ones(3, 16, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grid", [(2, 45, 20), (3, 16, 16)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bf16_on_cuda_matches_float64_reference(grid, pattern):
    """On CUDA in bf16 (fused kernels, masked or not) Skiparse matches the float64 dense masked reference."""
    q, k, v = (t.detach() for t in random_qkv(2, grid, heads=4, head_dim=64))
    expected = masked_attention_reference(q, k, v, skiparse_dense_mask(grid, 2, pattern))
    device_qkv = [t.to("cuda", torch.bfloat16) for t in (q, k, v)]
    out = skiparse_attention(*device_qkv, grid, pattern, 2)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=2e-2, atol=2e-2)
