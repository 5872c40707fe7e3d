"""Building blocks of the Wan2.1 DiT layer on megatron-core tensor-parallel linears.

Self-attention (q/k RMSNorm across heads, 3D RoPE, swappable core), cross-attention, AdaLN-modulated layer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.modules import module as module_hooks
from torch.utils.checkpoint import checkpoint

from osp_megatron.attention.context import AttentionContext, attend_in_layout
from osp_megatron.attention.rope import apply_rope
from osp_megatron.models.wan import fused
from osp_megatron.parallel import state
from osp_megatron.parallel.mappings import all_reduce_sum_with_grad
from osp_megatron.quantization.attention import attention_kernel


class FullAttention(torch.nn.Module):
    """Dense attention core over the tokens this rank holds (full layers, or subsequences in sparse layout)."""

    def __init__(self, config: TransformerConfig, **kwargs):
        super().__init__()

    def forward(self, q, k, v, context: AttentionContext):
        return attend_in_layout(q, k, v, context, attention_kernel(self))


class FusedBiasColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with the bias added inside the GEMM (cuBLASLt epilogue).

    megatron's own linear multiplies, then adds the bias in a separate pass over the output (about a
    millisecond per linear at 80k tokens x 5120). Here the local GEMM is torch's addmm, whose epilogue
    adds the bias; the input-gradient all-reduce over the tensor-parallel group goes through megatron's
    mapping. Sequence-parallel, gradient-accumulation-fusion and deferred-wgrad configurations, which need
    megatron's fused autograd function, take megatron's path unchanged.
    """

    def _forward_impl(
        self,
        input,
        weight,
        bias=None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        grad_output_buffer=None,
        wgrad_deferral_limit=None,
        tp_group=None,
        **kwargs,
    ):
        needs_megatron = (
            sequence_parallel
            or grad_output_buffer is not None
            or not weight.requires_grad
            or (gradient_accumulation_fusion and hasattr(weight, "main_grad"))
        )
        if needs_megatron:
            return super()._forward_impl(
                input=input,
                weight=weight,
                bias=bias,
                gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad,
                sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer,
                wgrad_deferral_limit=wgrad_deferral_limit,
                tp_group=tp_group,
                **kwargs,
            )
        if allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return F.linear(input, weight, bias)


def _without_global_hooks() -> bool:
    return not (
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


def _without_hooks(module: torch.nn.Module) -> bool:
    """True when calling `module` runs nothing but its forward (no hooks on it or on every module)."""
    return _without_global_hooks() and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _computes_local_linear(linear: torch.nn.Module) -> bool:
    """True when `linear(x)` is (F.linear(copy_to_tensor_model_parallel_region(x), weight, bias), None) on its
    shard of the outputs: FusedBiasColumnParallelLinear's own path, without a method patched onto the instance
    (quantization replaces `_forward_impl` there) and without the configurations it leaves to megatron's fused
    autograd function."""
    if type(linear) is not FusedBiasColumnParallelLinear:
        return False
    weight, bias, config = linear.weight, linear.bias, linear.config
    return (
        "forward" not in vars(linear)
        and "_forward_impl" not in vars(linear)
        and not (
            linear._forward_hooks
            or linear._forward_pre_hooks_with_kwargs
            or linear._backward_hooks
            or linear._backward_pre_hooks
        )
        and weight is not None
        and weight.requires_grad
        and bias is not None
        and not (
            linear.skip_bias_add
            or linear.gather_output
            or linear.sequence_parallel
            or linear.explicit_expert_comm
            or linear.disable_grad_reduce
        )
        and not (linear.gradient_accumulation_fusion and hasattr(weight, "main_grad"))
        and not config.defer_embedding_wgrad_compute
        and getattr(config, "_cpu_offloading_context", None) is None
    )


def column_linears_together(input: torch.Tensor, linears) -> tuple | None:
    """The outputs of column-parallel `linears` on one input, computed by a single GEMM, or None.

    The local weights and biases are concatenated, so the input is read once, and its gradient is one GEMM
    (and, with tensor parallelism, one all-reduce) instead of one per linear plus the sums autograd adds.
    Forward pre-hooks registered alike on every linear (the communication ledger's) run once on the shared
    input, as its one all-reduce. None when a linear would compute anything else (quantized, other hooks,
    sequence parallel, ...): the caller then calls the linears one by one.
    """
    first = linears[0]
    pre_hooks = list(first._forward_pre_hooks.values())
    if not _without_global_hooks() or not all(
        _computes_local_linear(linear)
        and list(linear._forward_pre_hooks.values()) == pre_hooks
        and linear.tp_group is first.tp_group
        and linear.weight.dtype == first.weight.dtype
        and linear.bias.dtype == first.bias.dtype
        for linear in linears
    ):
        return None
    for hook in pre_hooks:
        result = hook(first, (input,))
        if result is not None:
            input = result[0] if isinstance(result, tuple) else result
    # One copy as megatron makes for each linear: in ColumnParallelLinear.forward without tensor parallelism
    # (an identity), in _forward_impl (allreduce_dgrad) with it.
    input = copy_to_tensor_model_parallel_region(input, group=first.tp_group)
    weights, biases = [linear.weight for linear in linears], [linear.bias for linear in linears]
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # Concatenate the copies autocast would make for the GEMM anyway: half the bytes of float32 weights.
        dtype = torch.get_autocast_dtype(device)
        weights, biases = [weight.to(dtype) for weight in weights], [bias.to(dtype) for bias in biases]
    out = F.linear(input, torch.cat(weights), torch.cat(biases))
    return out.split([weight.shape[0] for weight in weights], dim=-1)


class HeadShardedRMSNorm(torch.nn.Module):
    """RMSNorm over all heads' channels (Wan's q/k norm) while tensor parallelism splits the heads.

    The mean square is taken over the full width, so the partial sums of squares are all-reduced over the
    tensor-parallel group; the weight is split like the heads. Without tensor parallelism the sum and the
    scaling are one fused pass.
    """

    def __init__(self, full_size: int, eps: float, tp_size: int):
        super().__init__()
        self.full_size, self.eps = full_size, eps
        self.weight = torch.nn.Parameter(torch.ones(full_size // tp_size))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def _holds_all_channels(self, x: torch.Tensor) -> bool:
        return x.shape[-1] == self.full_size and state.tensor_parallel_size() == 1

    def _square_total(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_with_grad(fused.square_sum(x), state.tensor_parallel_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._holds_all_channels(x):
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.rms_scale(x, self._square_total(x), self.weight, self.full_size, self.eps)


class FP32LayerNorm(torch.nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the activation dtype (the AdaLN statistics need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class CrossAttentionNorm(torch.nn.LayerNorm):
    """The block's affine LayerNorm before cross-attention: float32 statistics, output in the input's dtype.

    One fused pass on accelerators (fused.affine_layer_norm) instead of cast, norm and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.affine_layer_norm(x, self.weight, self.bias, self.eps)


@dataclass
class AttentionSubmodules:
    linear_q: ModuleSpec | type = None
    linear_k: ModuleSpec | type = None
    linear_v: ModuleSpec | type = None
    q_norm: ModuleSpec | type = None
    k_norm: ModuleSpec | type = None
    core_attention: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None


class WanAttention(MegatronModule):
    """Self- or cross-attention of a Wan block; heads are split over tensor-parallel ranks.

    Self-attention rotates q and k with the 3D RoPE tables of the tokens; cross-attention reads keys and
    values from the text states and uses no positions.
    """

    def __init__(self, config: TransformerConfig, submodules: AttentionSubmodules, is_cross: bool = False):
        super().__init__(config=config)
        dim, tp = config.hidden_size, config.tensor_model_parallel_size
        self.is_cross = is_cross
        self.heads_per_rank = config.num_attention_heads // tp
        self.head_dim = dim // config.num_attention_heads
        column = dict(
            config=config, init_method=config.init_method, bias=True, gather_output=False, skip_bias_add=False
        )
        self.linear_q = build_module(submodules.linear_q, dim, dim, **column)
        self.linear_k = build_module(submodules.linear_k, dim, dim, **column)
        self.linear_v = build_module(submodules.linear_v, dim, dim, **column)
        self.q_norm = build_module(submodules.q_norm, dim, config.layernorm_epsilon, tp)
        self.k_norm = build_module(submodules.k_norm, dim, config.layernorm_epsilon, tp)
        self.core_attention = build_module(submodules.core_attention, config=config)
        self.linear_proj = build_module(
            submodules.linear_proj,
            dim,
            dim,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads_per_rank, self.head_dim))

    def _project(self, source: torch.Tensor, *linears) -> tuple:
        together = column_linears_together(source, linears)
        return together if together is not None else tuple(linear(source)[0] for linear in linears)

    def _normed_heads(self, norm: torch.nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
        """norm(x) split into heads, rotated by RoPE when `rope` is given.

        Norm and rotation stay two compiled passes: one pass for both ran a 768P sparse block 6 ms slower on
        an H200 (its backward kernel is slower than the two it replaces).
        """
        x = self._heads(norm(x))
        return x if rope is None else apply_rope(x, *rope)

    def attention_inputs(self, hidden, rope=None, text_states=None) -> tuple:
        """(q, k, v) [B, N, heads, head_dim] for the attention core: projected, q and k normed and rotated."""
        if self.is_cross:  # a few hundred text tokens: concatenating the weights would cost more than it saves
            q, k, v = self.linear_q(hidden)[0], self.linear_k(text_states)[0], self.linear_v(text_states)[0]
        else:
            q, k, v = self._project(hidden, self.linear_q, self.linear_k, self.linear_v)
        return self._normed_heads(self.q_norm, q, rope), self._normed_heads(self.k_norm, k, rope), self._heads(v)

    def output(self, attended: torch.Tensor) -> tuple:
        """The output projection of the core's result [B, N, heads, head_dim]: (output, its bias)."""
        return self.linear_proj(attended.flatten(-2))

    def forward(self, hidden, context: AttentionContext, rope=None, text_states=None):
        """(output without its bias, output bias): the caller folds the bias into its residual update."""
        return self.output(self.core_attention(*self.attention_inputs(hidden, rope, text_states), context))


@dataclass
class WanMLPSubmodules:
    linear_fc1: ModuleSpec | type = None
    linear_fc2: ModuleSpec | type = None


class WanMLP(MegatronModule):
    """Wan's feed-forward: column-parallel fc1 (bias in the GEMM), GELU-tanh, row-parallel fc2.

    Returns (output, fc2 bias) like megatron-core's MLP so the block folds the bias into its gated
    residual; parameter names match megatron's MLP (linear_fc1, linear_fc2).
    """

    def __init__(self, config: TransformerConfig, submodules: WanMLPSubmodules, ffn_hidden_size: int = None):
        super().__init__(config=config)
        ffn = ffn_hidden_size or config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            ffn,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            skip_bias_add=False,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            ffn,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(self, hidden):
        return self.linear_fc2(fused.gelu_tanh(self.linear_fc1(hidden)[0]))


@dataclass
class WanLayerSubmodules:
    self_attention: ModuleSpec | type = None
    cross_attention: ModuleSpec | type = None
    mlp: ModuleSpec | type = None


class WanDiTLayer(MegatronModule):
    """One Wan2.1 block: AdaLN-modulated self-attention, cross-attention to text, modulated GELU FFN.

    `modulation` is the per-sample 6-way projection of the timestep embedding [B, 6, dim]; the block adds
    its own learned table (shift, scale, gate for attention, then shift, scale, gate for the FFN).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: WanLayerSubmodules,
        layer_number: int = 0,
        cross_attn_norm: bool = True,
    ):
        super().__init__(config=config)
        dim, eps = config.hidden_size, config.layernorm_epsilon
        self.layer_number = layer_number
        self.eps = eps  # the two AdaLN LayerNorms have no weights: fused.modulated_layer_norm computes them
        self.self_attention = build_module(submodules.self_attention, config=config)
        self.norm2 = CrossAttentionNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else torch.nn.Identity()
        self.cross_attention = build_module(submodules.cross_attention, config=config)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def _gated_residual_and_norm2(self, hidden, update, gate, bias):
        """(hidden + (update + bias) * gate, norm2 of that) in one pass when norm2 is the affine LayerNorm."""
        norm = self.norm2
        if type(norm) is CrossAttentionNorm and _without_hooks(norm):
            return fused.gated_residual_affine_norm(hidden, update, gate, bias, norm.weight, norm.bias, norm.eps)
        hidden = fused.gated_residual(hidden, update, gate, bias)
        return hidden, norm(hidden)

    def _modulations(self, modulation) -> tuple:
        """(shift, scale, gate) of the attention, then of the FFN: the block's table plus the timestep's."""
        return (self.modulation + modulation.float()).chunk(6, dim=1)

    def _self_attention_inputs(self, hidden, modulation, rope) -> tuple:
        shift, scale = self._modulations(modulation)[:2]
        return self.self_attention.attention_inputs(
            fused.modulated_layer_norm(hidden, shift, scale, self.eps), rope=rope
        )

    def _after_self_attention(self, hidden, attended, bias, text_states, modulation, context):
        """The rest of the block from the self-attention's output projection (and its bias) on."""
        gate, ffn_shift, ffn_scale, ffn_gate = self._modulations(modulation)[2:]
        hidden, normed = self._gated_residual_and_norm2(hidden, attended, gate, bias)
        crossed, bias = self.cross_attention(normed, AttentionContext(backend=context.backend), text_states=text_states)
        # The residual stream and the FFN's input come out of one pass, whose backward also adds their gradients.
        hidden, normed = fused.residual_modulated_norm(hidden, crossed, bias, ffn_shift, ffn_scale, self.eps)
        ffn_out, ffn_bias = self.mlp(normed)
        return fused.gated_residual(hidden, ffn_out, ffn_gate, ffn_bias)

    def _after_attention_core(self, hidden, core_output, text_states, modulation, context):
        return self._after_self_attention(
            hidden, *self.self_attention.output(core_output), text_states, modulation, context
        )

    def forward(
        self, hidden, text_states, modulation, rope, context: AttentionContext, selective_recompute: bool = False
    ):
        """The block; `selective_recompute` keeps only the attention core's saved tensors for the backward.

        Selective recomputation runs the work before the self-attention core (modulated norm, q/k/v GEMM, q/k
        norms, RoPE) and after it (output projection, cross-attention, FFN) under torch.utils.checkpoint, so the
        backward recomputes them from the block input and the core's output, while the core itself (whose
        saved q, k, v, output and softmax statistics are a few bytes per channel but whose recomputation is
        the block's most expensive kernel, and under Ulysses includes all-to-alls) runs once.
        """
        if not selective_recompute:
            shift, scale = self._modulations(modulation)[:2]
            attended, bias = self.self_attention(
                fused.modulated_layer_norm(hidden, shift, scale, self.eps), context, rope=rope
            )
            return self._after_self_attention(hidden, attended, bias, text_states, modulation, context)
        q, k, v = checkpoint(self._self_attention_inputs, hidden, modulation, rope, use_reentrant=False)
        # v is a view of the fused q/k/v GEMM output; the core would keep that whole buffer alive through it.
        core_output = self.self_attention.core_attention(q, k, v.contiguous(), context)
        return checkpoint(
            self._after_attention_core, hidden, core_output, text_states, modulation, context, use_reentrant=False
        )
