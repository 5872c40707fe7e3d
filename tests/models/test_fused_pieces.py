"""The block's fused pieces equal their plain PyTorch definitions: bias-in-GEMM linears, the MLP, the patch
embedding as one GEMM, the packed (padding-free) sparse layout with its permutation gradients, and the fused
element-wise passes and q/k/v GEMM of the block equal the pieces they replace."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import build_module

from osp_megatron.attention.context import AttentionContext, attend_packed, equal_length_groups
from osp_megatron.attention.dispatch import dot_product_attention
from osp_megatron.attention.rope import apply_rope, rope_tables
from osp_megatron.attention.skiparse import skiparse_dense_mask, sparse_key_mask, to_sparse_layout
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan import fused, layers
from osp_megatron.models.wan.layers import FusedBiasColumnParallelLinear, WanMLP, WanMLPSubmodules
from osp_megatron.models.wan.model import build_transformer_config
from osp_megatron.models.wan.spec import attention_spec, wan_layer_spec
from osp_megatron.parallel.layout import LocalTokenLayout, PermuteTokens
from osp_megatron.parallel.mappings import all_reduce_sum_with_grad
from osp_megatron.parallel.state import (
    ParallelConfig,
    ensure_single_rank_group,
    init_distributed,
    tensor_parallel_group,
)
from osp_megatron.utils import compile as compile_module


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


def tiny_config(**fields):
    return from_dict(ModelConfig, {"preset": "tiny", **fields}, "model")


def test_fused_bias_column_linear_equals_megatron_linear():
    config = build_transformer_config(tiny_config())
    torch.manual_seed(0)
    ours = FusedBiasColumnParallelLinear(
        64, 96, config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False
    )
    theirs = ColumnParallelLinear(
        64, 96, config=config, init_method=torch.nn.init.normal_, bias=True, gather_output=False
    )
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
        members = packed[start : start + length]
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


# -- fused element-wise passes and the one q/k/v GEMM ------------------------------------------------------------


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _values_and_gradients(fn, inputs, seed=0):
    """fn's outputs and the gradients of a random weighting of them with respect to every floating input (the
    parameters fn uses accumulate theirs)."""
    inputs = _leaves(*inputs)
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (out.double() * torch.randn(out.shape, generator=generator, dtype=torch.float64)).sum() for out in outputs
    )
    loss.backward()
    return [out.detach() for out in outputs], [t.grad for t in inputs if t is not None and t.requires_grad]


def _piece_cases(batch, dtype=torch.float64, with_bias=True):
    """(fused function, the pieces it replaces run one after another, inputs) for every fused element-wise pass."""
    generator = torch.Generator().manual_seed(batch)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    tokens, heads, head_dim = 6, 3, 8
    dim = heads * head_dim
    x, update = randn(batch, tokens, dim), randn(batch, tokens, dim)
    bias = randn(dim) if with_bias else None
    gate, shift, scale = (randn(batch, 1, dim).float() for _ in range(3))
    weight, norm_bias = 1 + randn(dim) / 4, randn(dim)
    eps = 1e-6

    def gated_norm_pieces(x, update, gate, bias, weight, norm_bias):
        hidden = fused.gated_residual(x, update, gate, bias)
        return hidden, fused.affine_layer_norm(hidden, weight, norm_bias, eps)

    def modulated_norm_pieces(x, update, bias, shift, scale):
        hidden = fused.residual(x, update, bias)
        return hidden, fused.modulated_layer_norm(hidden, shift, scale, eps)

    return {
        "gated_residual_affine_norm": (
            lambda *a: fused.gated_residual_affine_norm(*a, eps),
            gated_norm_pieces,
            (x, update, gate, bias, weight, norm_bias),
        ),
        "residual_modulated_norm": (
            lambda *a: fused.residual_modulated_norm(*a, eps),
            modulated_norm_pieces,
            (x, update, bias, shift, scale),
        ),
        "rms_norm": (
            lambda x, w: fused.rms_norm(x, w, eps),
            lambda x, w: fused.rms_scale(x, fused.square_sum(x), w, dim, eps),
            (x, weight),
        ),
    }


@pytest.mark.parametrize("name", ["gated_residual_affine_norm", "residual_modulated_norm", "rms_norm"])
@pytest.mark.parametrize("batch, with_bias", [(1, True), (2, True), (2, False)])
def test_fused_pass_equals_its_pieces(name, batch, with_bias):
    """Each fused pass returns what the pieces it replaces return one after another, and the same gradient
    for every input (float64 inputs, eager: bitwise), also for one-sample modulation and without a bias."""
    fused_fn, pieces, inputs = _piece_cases(batch, with_bias=with_bias)[name]
    (outputs, grads), (expected, expected_grads) = (_values_and_gradients(fn, inputs) for fn in (fused_fn, pieces))
    for out, reference in zip(outputs + grads, expected + expected_grads, strict=True):
        assert out.dtype == reference.dtype and torch.equal(out, reference)


@pytest.mark.parametrize(
    "name, batch", [("gated_residual_affine_norm", 1), ("residual_modulated_norm", 2), ("rms_norm", 2)]
)
@pytest.mark.slow
def test_compiled_fused_pass_equals_eager_pieces(name, batch, monkeypatch):
    """With OSP_MEGATRON_COMPILE=force the fused passes run as torch.compile graphs on the CPU: values and the
    gradients of their compiled backward (two gradient paths added inside it) equal the eager pieces."""
    fused_fn, pieces, inputs = _piece_cases(batch, dtype=torch.float32)[name]
    expected, expected_grads = _values_and_gradients(pieces, inputs)
    monkeypatch.setattr(compile_module, "_COMPILE", "force")
    outputs, grads = _values_and_gradients(fused_fn, inputs)
    for out, reference in zip(outputs + grads, expected + expected_grads, strict=True):
        assert out.shape == reference.shape and out.dtype == reference.dtype
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def piecewise_attention(attention, hidden, context, rope=None, text_states=None):
    """WanAttention as its modules compose without fusion: three linears, norm, then RoPE."""
    source = text_states if attention.is_cross else hidden

    def normed(norm, x):
        total = all_reduce_sum_with_grad(fused.square_sum(x), tensor_parallel_group())
        return fused.rms_scale(x, total, norm.weight, norm.full_size, norm.eps)

    q = attention._heads(normed(attention.q_norm, attention.linear_q(hidden)[0]))
    k = attention._heads(normed(attention.k_norm, attention.linear_k(source)[0]))
    v = attention._heads(attention.linear_v(source)[0])
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return attention.linear_proj(attention.core_attention(q, k, v, context).flatten(-2))


def piecewise_block(layer, hidden, text_states, modulation, rope, context):
    """WanDiTLayer as its pieces compose without fusion."""
    shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (layer.modulation + modulation.float()).chunk(6, dim=1)
    normed = fused.modulated_layer_norm(hidden, shift, scale, layer.eps)
    attended, bias = piecewise_attention(layer.self_attention, normed, context, rope=rope)
    hidden = fused.gated_residual(hidden, attended, gate, bias)
    crossed, bias = piecewise_attention(
        layer.cross_attention, layer.norm2(hidden), AttentionContext(), text_states=text_states
    )
    hidden = fused.residual(hidden, crossed, bias)
    ffn_out, ffn_bias = layer.mlp(fused.modulated_layer_norm(hidden, ffn_shift, ffn_scale, layer.eps))
    return fused.gated_residual(hidden, ffn_out, ffn_gate, ffn_bias)


def _random_module(module, dtype=torch.float64):
    torch.manual_seed(0)
    module = module.to(dtype)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return module


def _count_fused_projections(monkeypatch):
    """Counts the calls of column_linears_together that computed the linears together."""
    calls = []
    original = layers.column_linears_together

    def counting(input, linears):
        outputs = original(input, linears)
        calls.append(outputs is not None)
        return outputs

    monkeypatch.setattr(layers, "column_linears_together", counting)
    return calls


def _compare_module_runs(module, run, reference, inputs):
    """run(module, *inputs) and reference(module, *inputs): values, input and parameter gradients (float64)."""
    results = []
    for fn in (run, reference):
        module.zero_grad(set_to_none=True)
        outputs, grads = _values_and_gradients(lambda *a: fn(module, *a), inputs)
        results.append((outputs, grads, {name: param.grad for name, param in module.named_parameters()}))
    (outputs, grads, params), (expected, expected_grads, expected_params) = results
    for out, reference_out in zip(outputs + grads, expected + expected_grads, strict=True):
        torch.testing.assert_close(out, reference_out, rtol=1e-12, atol=1e-12)
    assert params.keys() == expected_params.keys()
    for name, grad in params.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected_params[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("cross_attn_norm, kind, batch", [(True, "full", 2), (False, "token", 1), (True, "group", 1)])
def test_fused_block_equals_its_pieces(cross_attn_norm, kind, batch, monkeypatch):
    """A Wan block with one q/k/v GEMM, fused q/k RMSNorm + RoPE and the residual + norm passes equals its
    pieces composed one by one (values, input gradients and every parameter gradient, float64); the sparse
    layouts' RoPE tables are permuted, and without cross_attn_norm the block keeps its plain residual."""
    config = build_transformer_config(tiny_config())
    grid = (2, 4, 4)
    layer = _random_module(build_module(wan_layer_spec(cross_attn_norm=cross_attn_norm), config=config))
    layout = LocalTokenLayout(grid, 1 if kind == "full" else 2, config.kv_channels, 10000.0, "cpu")
    rope = tuple(t.double() for t in layout.rope(kind))
    context = layout.attention_context(kind)
    hidden = torch.randn(batch, math.prod(grid), config.hidden_size, dtype=torch.float64)
    text, modulation = torch.randn(batch, 5, config.hidden_size, dtype=torch.float64), torch.randn(batch, 6, 64)
    fused_projections = _count_fused_projections(monkeypatch)
    _compare_module_runs(
        layer,
        lambda m, h, t, mod: m(h, t, mod, rope, context),
        lambda m, h, t, mod: piecewise_block(m, h, t, mod, rope, context),
        (hidden, text, modulation),
    )
    assert fused_projections == [True]  # self-attention only; cross-attention's text projections stay apart


def test_quantized_or_hooked_linears_keep_their_own_gemms(monkeypatch):
    """Quantized q/k/v linears run their own (quantized) GEMMs as before; pre-hooks registered alike on the
    three run once on the shared input, other hooks keep the linears apart."""
    from osp_megatron.quantization import ModulesConfig, QuantConfig, apply_quantization, remove_quantization

    config = build_transformer_config(tiny_config())
    attention = _random_module(build_module(attention_spec(), config=config), torch.float32)
    rope = rope_tables((1, 2, 4), attention.head_dim)
    hidden = torch.randn(2, 8, config.hidden_size)
    fused_projections = _count_fused_projections(monkeypatch)

    def run(module, x):
        return module(x, AttentionContext(), rope=rope)[0]

    def reference(module, x):
        return piecewise_attention(module, x, AttentionContext(), rope=rope)[0]

    plain = run(attention, hidden)
    quant = QuantConfig(recipe="hif8", modules=ModulesConfig(include=["linear_*"], exclude=[]))
    assert apply_quantization(attention, quant) == ["linear_q", "linear_k", "linear_v", "linear_proj"]
    quantized = run(attention, hidden)
    assert fused_projections == [True, False]
    assert torch.equal(quantized, reference(attention, hidden)) and not torch.allclose(quantized, plain)
    remove_quantization(attention)

    seen = []

    def watch(module, args):
        seen.append(args[0])

    handles = [
        linear.register_forward_pre_hook(watch)
        for linear in (attention.linear_q, attention.linear_k, attention.linear_v)
    ]
    torch.testing.assert_close(run(attention, hidden), plain, rtol=0, atol=0)
    assert fused_projections[-1] and len(seen) == 1 and seen[0] is hidden
    handles.append(attention.linear_k.register_forward_hook(lambda module, args, output: seen.append(output)))
    out = run(attention, hidden)
    assert not fused_projections[-1] and len(seen) == 1 + 3 + 1
    torch.testing.assert_close(out, reference(attention, hidden), rtol=0, atol=0)
    for handle in handles:
        handle.remove()


def test_fused_projection_under_autocast_keeps_float32_gradients():
    """Under bfloat16 autocast the one q/k/v GEMM runs in bfloat16 like the three, and the float32 weights get
    float32 gradients equal to the three linears' (within bfloat16 GEMM rounding)."""
    config = build_transformer_config(tiny_config())
    attention = _random_module(build_module(attention_spec(), config=config), torch.float32)
    linears = (attention.linear_q, attention.linear_k, attention.linear_v)
    hidden = torch.randn(2, 8, config.hidden_size)
    results = []
    for fn in (lambda x: layers.column_linears_together(x, linears), lambda x: [linear(x)[0] for linear in linears]):
        attention.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = fn(hidden)
        sum(out.float().square().sum() for out in outputs).backward()
        results.append((outputs, [param.grad for linear in linears for param in linear.parameters()]))
    (outputs, grads), (expected, expected_grads) = results
    for out, reference in zip(outputs, expected, strict=True):
        assert out.dtype == reference.dtype == torch.bfloat16
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference, rtol=5e-2, atol=5e-2 * float(reference.abs().max()))


def _tensor_parallel_attention(rank, world_size):
    """Self-attention on `world_size` tensor-parallel ranks, fused and piece by piece: the largest differences of
    outputs and gradients, and the column-parallel input-gradient all-reduces each counted."""
    from osp_megatron.parallel.ledger import recording, watch_tensor_parallel_linears

    init_distributed(ParallelConfig(tensor=world_size))
    config = build_transformer_config(tiny_config(), tensor_parallel=world_size)
    attention = _random_module(build_module(attention_spec(), config=config))
    watch_tensor_parallel_linears(attention)
    torch.manual_seed(1)
    hidden = torch.randn(2, 16, config.hidden_size, dtype=torch.float64)
    layout = LocalTokenLayout((1, 4, 4), 2, attention.head_dim, 10000.0, "cpu")
    rope, context = tuple(t.double() for t in layout.rope("token")), layout.attention_context("token")
    runs = []
    for fn in (
        lambda x: attention(x, context, rope=rope)[0],
        lambda x: piecewise_attention(attention, x, context, rope)[0],
    ):
        attention.zero_grad(set_to_none=True)
        with recording() as ledger:
            outputs, grads = _values_and_gradients(fn, (hidden,))
            reduces = sum(entry.calls for entry in ledger.entries() if entry.tag == "column_parallel_input_grad")
        runs.append(
            (outputs + grads + [param.grad for param in attention.parameters() if param.grad is not None], reduces)
        )
    (values, reduces), (expected, expected_reduces) = runs
    return max(float((a - b).abs().max()) for a, b in zip(values, expected, strict=True)), reduces, expected_reduces


@pytest.mark.slow
def test_tensor_parallel_fused_projection_equals_its_pieces():
    """With tensor parallelism 2 the one q/k/v GEMM takes one input-gradient all-reduce instead of three, and
    the attention (all-reduced q/k norm sums, RoPE fused with the scaling) equals the pieces on every rank."""
    for difference, reduces, expected_reduces in run_on_ranks(_tensor_parallel_attention, 2):
        assert difference < 1e-12
        assert (reduces, expected_reduces) == (1, 3)
