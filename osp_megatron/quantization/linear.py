"""Quantized GEMMs for linear layers: the autocast context, apply/remove on a model, scale checkpoints.

nn.Linear gets its ``forward`` swapped, megatron-core Column/RowParallelLinear their ``_forward_impl``.
"""

import fnmatch
import sys
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from osp_megatron.config.errors import ConfigError
from osp_megatron.quantization.attention import (
    ATTENTION_STATE_ATTRIBUTE,
    AttentionQuantizationState,
    is_self_attention_core,
    quantized_attention_modules,
)
from osp_megatron.quantization.autocast import autocast_frames
from osp_megatron.quantization.backends import (
    TransformerEngineGemm,
    load_transformer_engine,
    scaled_mm_applies,
)
from osp_megatron.quantization.config import QuantConfig
from osp_megatron.quantization.gemm import (
    QuantizedLinearFunction,
    inference_gemm,
    linear_output_dtype,
    prepare_inference_weight,
)
from osp_megatron.quantization.recipes import ROLES, Recipe, TensorScaler
from osp_megatron.quantization.selection import fp8_pays_off, measured_here

_STATE_ATTRIBUTE = "_quantization_state"


class LinearQuantizationState:
    """Recipe, amax reduction group and per-role scalers of one quantized linear layer."""

    def __init__(
        self, recipe: Recipe, group: dist.ProcessGroup | None, patched: str, previous: Any, inference: bool = False
    ):
        self.group = group
        # Inference form: the weight is quantized once, on first use, and kept as codes; no backward.
        self.inference = inference
        self.weight_cache: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.patched = patched  # the instance attribute replaced: "forward" or "_forward_impl"
        self.previous = previous  # an instance attribute that was there before, restored on removal
        self.recipe = recipe
        self.scalers: dict[str, TensorScaler] = {role: recipe.make_scaler(role) for role in ROLES}
        self.te_gemm: TransformerEngineGemm | None = None
        self.warned_fallback = False

    def use_recipe(self, recipe: Recipe) -> None:
        """Switch recipe; scale histories restart because they belong to the old format."""
        if recipe != self.recipe:
            self.recipe = recipe
            self.scalers = {role: recipe.make_scaler(role) for role in ROLES}
            self.te_gemm = None

    def active(self) -> tuple[Recipe, dist.ProcessGroup | None] | None:
        """(recipe, group) to quantize this call with, or None to run in high precision."""
        frames = autocast_frames()
        if not frames:
            return self.recipe, self.group
        frame = frames[-1]
        if not frame.enabled:
            return None
        if frame.recipe is not None:
            self.use_recipe(frame.recipe)
        return self.recipe, frame.group if frame.group is not None else self.group

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {role: scaler.state_dict() for role, scaler in self.scalers.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        for role, scaler in self.scalers.items():
            scaler.load_state_dict(state[role])


def quantized_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: LinearQuantizationState,
    recipe: Recipe,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (no bias) quantized by ``recipe`` with the scalers of ``state``.

    out = qdq(x) @ qdq(W).T in the dtype the unquantized GEMM would give (autocast's under autocast); the
    backward uses qdq(grad_out) against qdq(W) and qdq(x) and passes those gradients straight through the
    quantizers to x and W. Only the 8-bit codes of x and W are kept for the backward (QuantizedLinearFunction).
    """
    if state.inference:
        return _inference_matmul(x, weight, state, recipe, group)
    if recipe.backend == "transformer_engine":
        if state.te_gemm is None:
            state.te_gemm = TransformerEngineGemm(weight, recipe)
        return state.te_gemm(x, weight, group)
    x2d = x.reshape(-1, x.shape[-1])
    on_scaled_mm = recipe.backend in ("auto", "scaled_mm") and scaled_mm_applies(recipe.format, x2d, weight)
    if recipe.backend == "scaled_mm" and not on_scaled_mm and not state.warned_fallback:
        state.warned_fallback = True
        warnings.warn(
            "quant.backend 'scaled_mm' needs an E4M3 recipe, CUDA capability >= 9.0 and in and out "
            f"features divisible by 16 (got {tuple(x2d.shape)} x {tuple(weight.shape)}); "
            "emulating this layer instead"
        )
    out_dtype = linear_output_dtype(x, weight)
    if measured_here(recipe, x2d, on_scaled_mm) and not fp8_pays_off(
        x2d, weight, recipe, True, out_dtype, group, on_scaled_mm
    ):
        return F.linear(x, weight)  # bf16 is faster for this shape on this device
    if on_scaled_mm:
        x2d = x2d.contiguous()
    out = QuantizedLinearFunction.apply(
        x2d, weight, state.scalers, group, out_dtype, on_scaled_mm, torch.is_grad_enabled()
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _cached_weight(
    weight: torch.Tensor, state: LinearQuantizationState, group, out_dtype: torch.dtype, on_scaled_mm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's 8-bit codes and inverse scale (scaled_mm), or its dequantized values in the output dtype
    (emulation), computed once and again only when the weight itself changes (a load, an EMA swap)."""
    key = (weight.data_ptr(), weight._version)
    if state.weight_cache is None or state.weight_cache[0] != key:
        prepared = prepare_inference_weight(weight, state.scalers["weight"], group, out_dtype, on_scaled_mm)
        state.weight_cache = (key, *prepared)
    return state.weight_cache[1], state.weight_cache[2]


def _inference_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: LinearQuantizationState,
    recipe: Recipe,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """``x @ weight.T`` of the inference form: x quantized per call, the weight's codes reused; no backward."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise RuntimeError(
            "this linear is quantized in its inference form (weights quantized once), which has no "
            "backward; quantize with the training form to train"
        )
    x2d = x.reshape(-1, x.shape[-1])
    out_dtype = linear_output_dtype(x, weight)
    on_scaled_mm = recipe.backend in ("auto", "scaled_mm") and scaled_mm_applies(recipe.format, x2d, weight)
    if measured_here(recipe, x2d, on_scaled_mm) and not fp8_pays_off(
        x2d, weight, recipe, False, out_dtype, group, on_scaled_mm
    ):
        return F.linear(x, weight)
    prepared = _cached_weight(weight, state, group, out_dtype, on_scaled_mm)
    out = inference_gemm(x2d, prepared, state.scalers["input"], group, out_dtype, on_scaled_mm)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out + bias in out's dtype (a float32 bias would promote a bf16 output to float32)."""
    return out if bias is None else out + bias.to(out.dtype)


def _original(module: torch.nn.Module, state: LinearQuantizationState):
    """The bound method that ran before quantization was applied."""
    if state.previous is not None:
        return state.previous
    return types.MethodType(getattr(type(module), state.patched), module)


def _quantized_torch_linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    state: LinearQuantizationState = getattr(self, _STATE_ATTRIBUTE)
    active = state.active()
    if active is None:
        return _original(self, state)(input)
    return _add_bias(quantized_matmul(input, self.weight, state, *active), self.bias)


def _quantized_megatron_forward_impl(
    self,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gradient_accumulation_fusion: bool = False,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    grad_output_buffer: list | None = None,
    wgrad_deferral_limit: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    **kwargs,
) -> torch.Tensor:
    """Drop-in ``_forward_impl``: megatron's own TP mappings around a quantized local GEMM.

    The gather/reduce-scatter (sequence parallel) and data-gradient all-reduce happen exactly as in
    megatron, but through its autograd mappings, so the overlap with the weight-gradient GEMM is
    lost.  Gradient-accumulation fusion is not used: the weight gradient lands in ``weight.grad``.
    """
    state: LinearQuantizationState = getattr(self, _STATE_ATTRIBUTE)
    active = state.active()
    if active is None:
        return _original(self, state)(
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
    if grad_output_buffer is not None:
        raise RuntimeError(
            "quantized linears do not support deferred embedding wgrad compute; exclude this "
            "layer with quant.modules.exclude"
        )
    from megatron.core.tensor_parallel import mappings

    group = tp_group if tp_group is not None else self.tp_group
    if sequence_parallel:
        input = mappings.gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:
        input = mappings.copy_to_tensor_model_parallel_region(input, group=group)
    return _add_bias(quantized_matmul(input, weight, state, *active), bias)


def _megatron_linear_types() -> tuple:
    # Only modules of an already imported megatron can be in the model; avoid importing it (slow,
    # and absent on some GPU images) just to run isinstance checks.
    layers = sys.modules.get("megatron.core.tensor_parallel.layers")
    if layers is None:
        return ()
    return (layers.ColumnParallelLinear, layers.RowParallelLinear)


def _patch_target(module: torch.nn.Module) -> tuple[str, Any] | None:
    """(attribute to replace, replacement function) for a supported linear layer, else None."""
    megatron_types = _megatron_linear_types()
    if megatron_types and isinstance(module, megatron_types):
        return "_forward_impl", _quantized_megatron_forward_impl
    if isinstance(module, torch.nn.Linear):
        return "forward", _quantized_torch_linear_forward
    return None


def module_is_selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """True when ``name`` matches an include pattern and no exclude pattern (fnmatch, case-sensitive)."""
    included = any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
    return included and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def apply_quantization(
    model: torch.nn.Module,
    quant_config: QuantConfig,
    amax_reduction_group: dist.ProcessGroup | None = None,
    inference: bool = False,
) -> list[str]:
    """Quantize the GEMMs of the selected linear layers of ``model`` in place.

    ``amax_reduction_group`` is the group whose ranks must agree on each scale (the tensor- and
    sequence-parallel group).  Returns the qualified names of the layers now quantized (with
    ``quant.attention``, the self-attention cores too); recipe "none" changes nothing.  Applying again
    replaces the previous quantization.  ``inference``: each weight is quantized once, on first use (again
    only if it changes), and only the inputs per call; such layers run forward only.
    """
    recipe = quant_config.build_recipe()
    if recipe is None:
        return []
    if recipe.backend == "transformer_engine":
        load_transformer_engine()
    remove_quantization(model)
    quantized = []
    for name, module in model.named_modules():
        target = _patch_target(module)
        if target is None or not module_is_selected(name, quant_config.modules.include, quant_config.modules.exclude):
            continue
        attribute, function = target
        previous = module.__dict__.get(attribute)
        state = LinearQuantizationState(recipe, amax_reduction_group, attribute, previous, inference)
        setattr(module, _STATE_ATTRIBUTE, state)
        setattr(module, attribute, types.MethodType(function, module))
        quantized.append(name)
    if quant_config.attention:
        for name, module in model.named_modules():
            if is_self_attention_core(name) and module_is_selected(
                name, quant_config.modules.include, quant_config.modules.exclude
            ):
                module.__dict__[ATTENTION_STATE_ATTRIBUTE] = AttentionQuantizationState(recipe)
                quantized.append(name)
    return quantized


def quantized_modules(model: torch.nn.Module) -> dict[str, LinearQuantizationState]:
    """Qualified name -> quantization state of every quantized layer of ``model``."""
    return {
        name: module.__dict__[_STATE_ATTRIBUTE]
        for name, module in model.named_modules()
        if _STATE_ATTRIBUTE in module.__dict__
    }


def remove_quantization(model: torch.nn.Module) -> list[str]:
    """Restore the original GEMMs of every quantized layer; returns their names."""
    removed = []
    for name, state in quantized_modules(model).items():
        module = model.get_submodule(name)
        del module.__dict__[state.patched]
        if state.previous is not None:
            module.__dict__[state.patched] = state.previous
        del module.__dict__[_STATE_ATTRIBUTE]
        removed.append(name)
    for name in quantized_attention_modules(model):
        del model.get_submodule(name).__dict__[ATTENTION_STATE_ATTRIBUTE]
        removed.append(name)
    return removed


def quantization_state_dict(model: torch.nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """Amax histories and scales of every quantized layer, keyed by layer name and role (FP8 attention
    cores: their gradient amax history under "fp8_attention")."""
    states = {name: state.state_dict() for name, state in quantized_modules(model).items()}
    states.update({name: state.state_dict() for name, state in quantized_attention_modules(model).items()})
    return states


def load_quantization_state_dict(
    model: torch.nn.Module, state_dict: dict[str, dict[str, dict[str, Any]]], strict: bool = True
) -> None:
    """Restore ``quantization_state_dict`` output; ``strict`` requires the same set of layers."""
    states = {**quantized_modules(model), **quantized_attention_modules(model)}
    if strict and set(states) != set(state_dict):
        missing, unexpected = sorted(set(states) - set(state_dict)), sorted(set(state_dict) - set(states))
        raise ConfigError(f"quantization state: layers missing from the checkpoint {missing}, unexpected {unexpected}")
    for name, state in states.items():
        if name in state_dict:
            state.load_state_dict(state_dict[name])
