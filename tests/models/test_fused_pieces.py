"""The block's fused pieces equal their plain PyTorch definitions: bias-in-GEMM linears, the MLP, the patch
embedding as one GEMM, and the packed (padding-free) sparse layout with its permutation gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from osp_megatron.attention.dispatch import dot_product_attention
from osp_megatron.attention.skiparse import skiparse_dense_mask, sparse_key_mask, to_sparse_layout
from osp_megatron.config.loader import from_dict
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.models.rope import rope_tables
from osp_megatron.models.wan.layers import (
    FusedBiasColumnParallelLinear,
    WanMLP,
    WanMLPSubmodules,
    attend_packed,
    equal_length_groups,
)
from osp_megatron.models.wan.model import build_transformer_config
from osp_megatron.parallel.layout import LocalTokenLayout, PermuteTokens
from osp_megatron.parallel.state import ensure_single_rank_group


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


def tiny_config(**fields):
    return from_dict(ModelConfig, {"preset": "tiny", **fields}, "model")


def test_fused_bias_column_linear_equals_megatron_linear():
    config = build_transformer_config(tiny_config())
    torch.manual_seed(0)
    ours = FusedBiasColumnParallelLinear(64, 96, config=config, init_method=torch.nn.init.normal_, bias=True,
                                         gather_output=False)
    theirs = ColumnParallelLinear(64, 96, config=config, init_method=torch.nn.init.normal_, bias=True,
                                  gather_output=False)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, bias = ours(x)
    expected, expected_bias = theirs(x_ref)
    assert bias is None and expected_bias is None
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, dict(theirs.named_parameters())[name].grad)


def test_wan_mlp_returns_output_and_the_fc2_bias_to_fold():
    config = build_transformer_config(tiny_config())
    mlp = WanMLP(config, WanMLPSubmodules(linear_fc1=FusedBiasColumnParallelLinear, linear_fc2=RowParallelLinear))
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(3, 5, config.hidden_size)
    out, bias = mlp(x)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    expected = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias), approximate="tanh"), fc2.weight)
    assert bias is fc2.bias
    torch.testing.assert_close(out, expected)


def test_patch_embedding_gemm_equals_the_conv():
    model = build_model(tiny_config())
    latents = torch.randn(2, 16, 3, 8, 10)
    grid = model.token_grid(latents)
    expected = model.patch_embedding(latents).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.embed_patches(latents, grid), expected, rtol=1e-5, atol=1e-5)


def test_permute_tokens_gradient_is_the_inverse_gather():
    order = torch.randperm(11)
    inverse = torch.argsort(order)
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(PermuteTokens.apply(x, order, inverse), x[:, order])
    assert torch.autograd.gradcheck(lambda t: PermuteTokens.apply(t, order, inverse), (x,))


def test_equal_length_groups():
    assert equal_length_groups((6, 6, 5, 5)) == [(6, 2), (5, 2)]
    assert equal_length_groups((4, 3, 4)) == [(4, 1), (3, 1), (4, 1)]


def test_attend_packed_equals_attention_inside_each_subsequence():
    lengths = (6, 6, 5, 4, 4)
    q, k, v = (torch.randn(2, sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    out = attend_packed(q, k, v, lengths)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        torch.testing.assert_close(out[:, part], dot_product_attention(q[:, part], k[:, part], v[:, part]))
        start += length
    with pytest.raises(ValueError, match="sum to 25 but q holds 24"):
        attend_packed(q[:, :24], k[:, :24], v[:, :24], lengths)


@pytest.mark.parametrize("grid", [(2, 5, 6), (1, 6, 18), (3, 7, 5)])
@pytest.mark.parametrize("kind", ["token", "group"])
def test_packed_layout_holds_only_real_tokens_in_subsequence_order(grid, kind):
    """Grids that need padding: N tokens (no padding) in the sparse order, subsequence lengths and RoPE
    tables follow the tokens, and the lengths group exactly the tokens that may attend to each other."""
    layout = LocalTokenLayout(grid, 2, 16, 10000.0, "cpu")
    assert layout.packed
    tokens = math.prod(grid)
    ids = torch.arange(tokens, dtype=torch.float64).reshape(1, tokens, 1)
    packed = layout.enter(ids, kind)[0, :, 0].long()
    assert packed.shape[0] == tokens and sorted(packed.tolist()) == list(range(tokens))
    # the padded layout without its padding is the packed order
    padded = to_sparse_layout(ids + 1, grid, 2, kind)[..., 0]
    assert torch.equal(packed, (padded[padded > 0] - 1).long())
    lengths = layout.attention_context(kind).lengths
    assert list(lengths) == sparse_key_mask(grid, 2, kind).sum(dim=1).tolist()
    allowed = skiparse_dense_mask(grid, 2, kind)
    start = 0
    for length in lengths:
        members = packed[start:start + length]
        assert allowed[members][:, members].all()  # one subsequence attends within itself ...
        start += length
    assert allowed.sum() == sum(length * length for length in lengths)  # ... and nowhere else
    cos, sin = rope_tables(grid, 16, 10000.0, "cpu")
    assert torch.equal(layout.rope(kind)[0], cos[:, packed]) and torch.equal(layout.rope(kind)[1], sin[:, packed])


def test_unpadded_grid_keeps_the_reshape_layout():
    layout = LocalTokenLayout((2, 8, 8), 2, 16, 10000.0, "cpu")
    assert not layout.packed and layout.attention_context("token").lengths is None


def test_uninitialised_build_marks_the_same_tensor_parallel_weights():
    """build_model(initialize=False) allocates without initialising and still marks every split parameter
    as megatron's initialisation does (checkpoints and the gradient norm read these marks)."""
    from osp_megatron.checkpointing.sharded import partition_dim

    config = tiny_config(sparse_ratio=2, full_blocks=1)
    initialised, bare = build_model(config), build_model(config, initialize=False)
    marks = {name: partition_dim(param) for name, param in initialised.named_parameters()}
    assert {name: partition_dim(param) for name, param in bare.named_parameters()} == marks
    assert marks["blocks.0.self_attention.linear_q.weight"] == 0
    assert marks["blocks.0.mlp.linear_fc2.weight"] == 1
