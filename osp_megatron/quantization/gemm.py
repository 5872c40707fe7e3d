"""The quantized GEMM of a linear layer: x and W as per-tensor scaled 8-bit codes, which the backward keeps.

The three GEMMs run on torch._scaled_mm where it applies (E4M3 operands on SM90) and on the dequantized codes
elsewhere (HiF8, E5M2, the CPU and older GPUs); either way the backward keeps the same 8-bit codes.
"""

import torch
import torch.nn.functional as F

from osp_megatron.quantization.backends import pad_rows


def linear_output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) returns here: autocast's where autocast is on, else type promotion.

    A quantized linear must hand on what the 16-bit one would: a float32 output under bf16 autocast doubles
    the bytes of every activation after it, up to the next GEMM.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous().t()


class QuantizedLinearFunction(torch.autograd.Function):
    """``x2d @ W.T`` with x and W quantized per tensor by their scalers, the output gradient in the backward.

    Forward: the codes of x and W (1 byte each for FP8, E4M3 on the hardware path) and their inverse scales are
    all that is saved; the output is in ``out_dtype``. Backward: the output gradient is quantized by the
    "grad_output" scaler; dx = qdq(dy) qdq(W) and dW = qdq(dy)^T qdq(x) pass straight through the quantizers.
    ``on_scaled_mm`` runs all three GEMMs in FP8 with float32 accumulation; otherwise the codes are decoded
    to ``out_dtype`` and multiplied there (quantize-dequantize emulation).
    """

    @staticmethod
    def forward(ctx, x2d, weight, scalers, group, out_dtype: torch.dtype, on_scaled_mm: bool):
        ctx.rows = rows = x2d.shape[0]
        if on_scaled_mm:
            x2d = pad_rows(x2d)  # zero rows up to a multiple of 16; sliced off the output again
        x_codes, x_inverse = scalers["input"].encode(x2d, group)
        w_codes, w_inverse = scalers["weight"].encode(weight, group)
        if on_scaled_mm:
            out = torch._scaled_mm(x_codes, w_codes.t(), scale_a=x_inverse, scale_b=w_inverse, out_dtype=out_dtype)
            out = out[:rows]
        else:
            decode = scalers["input"].format.decode
            out = F.linear(
                decode(x_codes, x_inverse, out_dtype), scalers["weight"].format.decode(w_codes, w_inverse, out_dtype)
            )
        ctx.save_for_backward(x_codes, w_codes, x_inverse, w_inverse)
        ctx.scalers, ctx.group, ctx.on_scaled_mm = scalers, group, on_scaled_mm
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_codes, w_codes, x_inverse, w_inverse = ctx.saved_tensors
        grad_scaler, scalers = ctx.scalers["grad_output"], ctx.scalers
        grad_input = grad_weight = None
        if ctx.on_scaled_mm:
            grad_out = pad_rows(grad_out)  # the zero rows of the padded input get zero gradients
            if ctx.needs_input_grad[1]:
                grad_codes, grad_codes_t, grad_inverse = grad_scaler.encode_transposed(grad_out.contiguous(), ctx.group)
            else:
                grad_codes, grad_inverse = grad_scaler.encode(grad_out.contiguous(), ctx.group)
            if ctx.needs_input_grad[0]:
                grad_input = torch._scaled_mm(
                    grad_codes,
                    _column_major(w_codes),
                    scale_a=grad_inverse,
                    scale_b=w_inverse,
                    out_dtype=ctx.input_dtype,
                )[: ctx.rows]
            if ctx.needs_input_grad[1]:
                grad_weight = torch._scaled_mm(
                    grad_codes_t,
                    _column_major(x_codes),
                    scale_a=grad_inverse,
                    scale_b=x_inverse,
                    out_dtype=ctx.weight_dtype,
                )
            return grad_input, grad_weight, None, None, None, None
        grad = grad_scaler.quantize_dequantize(grad_out, ctx.group)
        if ctx.needs_input_grad[0]:
            weight = scalers["weight"].format.decode(w_codes, w_inverse, grad.dtype)
            grad_input = (grad @ weight).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            x2d = scalers["input"].format.decode(x_codes, x_inverse, grad.dtype)
            grad_weight = (grad.t() @ x2d).to(ctx.weight_dtype)
        return grad_input, grad_weight, None, None, None, None
