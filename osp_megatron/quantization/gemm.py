"""The quantized GEMM of a linear layer: x and W as per-tensor scaled 8-bit codes, which the backward keeps.

The three GEMMs run on torch._scaled_mm where it applies (E4M3 operands on SM90) and on the dequantized codes
elsewhere (HiF8, E5M2, the CPU and older GPUs); either way the backward keeps the same 8-bit codes.
"""

import threading

import torch
import torch.nn.functional as F

from osp_megatron.quantization.backends import SCALED_MM_ALIGNMENT


def linear_output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) returns here: autocast's where autocast is on, else type promotion.

    A quantized linear must hand on what the 16-bit one would: a float32 output under bf16 autocast doubles
    the bytes of every activation after it, up to the next GEMM.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


class QuantizedLinearFunction(torch.autograd.Function):
    """``x2d @ W.T`` with x and W quantized per tensor by their scalers, the output gradient in the backward.

    Forward: the codes of x and W (1 byte each for FP8, E4M3 on the hardware path) and their inverse scales are
    all that is saved; the output is in ``out_dtype``. Backward: the output gradient is quantized by the
    "grad_output" scaler; dx = qdq(dy) qdq(W) and dW = qdq(dy)^T qdq(x) pass straight through the quantizers.
    ``on_scaled_mm`` runs all three GEMMs in FP8 with float32 accumulation: the codes the backward GEMMs need are
    those of x and W transposed, which the forward's fused cast writes beside the ones it multiplies (and keeps
    instead of them); token counts off a multiple of 16 get zero rows in the codes, sliced off the outputs.
    Otherwise the codes are decoded to ``out_dtype`` and multiplied there (quantize-dequantize emulation).
    ``grad_enabled``: whether a backward can follow (autograd's grad mode at the call), else nothing is kept.
    """

    @staticmethod
    def forward(ctx, x2d, weight, scalers, group, out_dtype: torch.dtype, on_scaled_mm: bool, grad_enabled: bool):
        ctx.rows = rows = x2d.shape[0]
        ctx.scalers, ctx.group, ctx.on_scaled_mm = scalers, group, on_scaled_mm
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        if not on_scaled_mm:
            x_codes, _, x_inverse = _encode_input(scalers["input"], x2d, group, False, 1)
            w_codes, w_inverse = scalers["weight"].encode(weight, group)
            decode = scalers["input"].format.decode
            out = F.linear(
                decode(x_codes, x_inverse, out_dtype), scalers["weight"].format.decode(w_codes, w_inverse, out_dtype)
            )
            if grad_enabled:
                ctx.save_for_backward(x_codes, w_codes, x_inverse, w_inverse)
            return out
        need_grad_input, need_grad_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        x_codes, x_codes_t, x_inverse = _encode_input(
            scalers["input"], x2d, group, need_grad_weight, SCALED_MM_ALIGNMENT
        )
        w_codes, w_codes_t, w_inverse = _encode(scalers["weight"], weight, group, need_grad_input, 1)
        out = torch._scaled_mm(x_codes, w_codes.t(), scale_a=x_inverse, scale_b=w_inverse, out_dtype=out_dtype)
        if grad_enabled:
            # Transposed (row-major) codes: the backward hands their .t(), column-major, to torch._scaled_mm.
            ctx.save_for_backward(x_codes_t, w_codes_t, x_inverse, w_inverse)
        return out[:rows]

    @staticmethod
    def backward(ctx, grad_out):
        shared_input.entry = None  # the forward's last input and its codes need not live through the backward
        grad_scaler, scalers = ctx.scalers["grad_output"], ctx.scalers
        grad_input = grad_weight = None
        if ctx.on_scaled_mm:
            x_codes_t, w_codes_t, x_inverse, w_inverse = ctx.saved_tensors
            grad_codes, grad_codes_t, grad_inverse = _encode(
                grad_scaler, grad_out.contiguous(), ctx.group, ctx.needs_input_grad[1], SCALED_MM_ALIGNMENT
            )
            if ctx.needs_input_grad[0]:
                grad_input = torch._scaled_mm(
                    grad_codes, w_codes_t.t(), scale_a=grad_inverse, scale_b=w_inverse, out_dtype=ctx.input_dtype
                )[: ctx.rows]
            if ctx.needs_input_grad[1]:
                grad_weight = torch._scaled_mm(
                    grad_codes_t, x_codes_t.t(), scale_a=grad_inverse, scale_b=x_inverse, out_dtype=ctx.weight_dtype
                )
            return grad_input, grad_weight, None, None, None, None, None
        x_codes, w_codes, x_inverse, w_inverse = ctx.saved_tensors
        grad = grad_scaler.quantize_dequantize(grad_out, ctx.group)
        if ctx.needs_input_grad[0]:
            weight = scalers["weight"].format.decode(w_codes, w_inverse, grad.dtype)
            grad_input = (grad @ weight).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            x2d = scalers["input"].format.decode(x_codes, x_inverse, grad.dtype)
            grad_weight = (grad.t() @ x2d).to(ctx.weight_dtype)
        return grad_input, grad_weight, None, None, None, None, None


def prepare_inference_weight(
    weight: torch.Tensor, scaler, group, out_dtype: torch.dtype, on_scaled_mm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the inference form keeps of a weight: its codes and inverse scale (scaled_mm), or its dequantized
    values in the output dtype (emulation)."""
    codes, inverse = scaler.encode(weight.detach(), group)
    if not on_scaled_mm:
        codes = scaler.format.decode(codes, inverse, out_dtype)
    return codes, inverse


def inference_gemm(
    x2d: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], x_scaler, group, out_dtype, on_scaled_mm: bool
) -> torch.Tensor:
    """``x2d @ W.T`` of the inference form: x quantized per call, W as ``prepare_inference_weight`` left it."""
    weight, w_inverse = prepared
    if not on_scaled_mm:
        x_codes, _, x_inverse = _encode_input(x_scaler, x2d, group, False, 1)
        return F.linear(x_scaler.format.decode(x_codes, x_inverse, out_dtype), weight)
    x_codes, _, x_inverse = _encode_input(x_scaler, x2d.contiguous(), group, False, SCALED_MM_ALIGNMENT)
    out = torch._scaled_mm(x_codes, weight.t(), scale_a=x_inverse, scale_b=w_inverse, out_dtype=out_dtype)
    return out[: x2d.shape[0]]


class _SharedInput(threading.local):
    """The last input encoded and its codes: linears that read the same tensor one after the
    other (q, k and v of one attention, k and v of a cross-attention) encode it once and keep one copy of its codes
    for their backward, where 16-bit linears keep one copy of the tensor. The entry holds the tensor itself, so its
    memory cannot be reused by another tensor while the entry lives; a write to it changes its version."""

    entry: tuple | None = None


shared_input = _SharedInput()


def _encode_input(scaler, x2d: torch.Tensor, group, transposed: bool, row_multiple: int):
    """``_encode`` of a linear's input, shared with the previous linear that encoded the same tensor alike."""
    if not scaler.shares_encodes(x2d, group):
        return _encode(scaler, x2d, group, transposed, row_multiple)
    settings = (scaler.settings(), transposed, row_multiple)
    key = (x2d.device, x2d.data_ptr(), x2d._version, x2d.shape, x2d.stride(), x2d.dtype, settings)
    entry = shared_input.entry
    if entry is not None and entry[1] == key:
        codes, codes_t, inverse, scale, recorded = entry[2:]
        scaler.adopt(scale, recorded)
        return codes, codes_t, inverse
    codes, codes_t, inverse = _encode(scaler, x2d, group, transposed, row_multiple)
    shared_input.entry = (x2d, key, codes, codes_t, inverse, scaler.scale, scaler.amax_history[0])
    return codes, codes_t, inverse


def _encode(scaler, tensor: torch.Tensor, group, transposed: bool, row_multiple: int):
    """(codes, their transpose or None, 1 / scale) of ``tensor``, rows padded to ``row_multiple``."""
    if transposed:
        return scaler.encode_transposed(tensor, group, row_multiple)
    codes, inverse = scaler.encode(tensor, group, row_multiple)
    return codes, None, inverse
