"""Hardware GEMM paths for quantized linears: FP8 torch._scaled_mm on SM90, Transformer Engine, Ascend.

Each is optional: callers ask whether it applies and fall back to quantize-dequantize emulation.
"""

from typing import Callable, Dict, Optional

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.quantization.kernels import fused_on_cuda

SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm needs every GEMM dimension to be a multiple of 16
SCALED_MM_FORMATS = ("e4m3", "hybrid")  # E5M2 x E5M2 GEMMs are not supported by the hardware


def scaled_mm_applies(recipe_format: str, x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the FP8 GEMMs of ``x2d @ weight.T`` and its gradients can run on torch._scaled_mm."""
    if recipe_format not in SCALED_MM_FORMATS or not x2d.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x2d.device) < (9, 0):
        return False
    tokens, in_features = x2d.shape
    return all(dim % SCALED_MM_ALIGNMENT == 0 for dim in (tokens, in_features, weight.shape[0]))


@fused_on_cuda
def _scale_and_cast(tensor: torch.Tensor, scale: torch.Tensor, max_value: float, fp8_dtype: torch.dtype):
    return (tensor.to(torch.float32) * scale).clamp(-max_value, max_value).to(fp8_dtype)


def _cast_fp8(tensor: torch.Tensor, scale: torch.Tensor, fmt) -> torch.Tensor:
    return _scale_and_cast(tensor, scale, fmt.max_value, fmt.torch_dtype)


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous().t()


class ScaledMMLinearFunction(torch.autograd.Function):
    """``x @ W.T`` with x, W in E4M3 and the output gradient in the recipe's backward format.

    All three GEMMs (forward, data gradient, weight gradient) run in FP8 with per-tensor scales
    and float32 accumulation; the FP8 copies of x and W are what is saved for backward.
    """

    @staticmethod
    def forward(ctx, x2d, weight, scalers: Dict[str, object], group):
        input_scaler, weight_scaler = scalers["input"], scalers["weight"]
        input_scale = input_scaler.compute_scale(x2d, group)
        weight_scale = weight_scaler.compute_scale(weight, group)
        x_fp8 = _cast_fp8(x2d, input_scale, input_scaler.format)
        w_fp8 = _cast_fp8(weight, weight_scale, weight_scaler.format)
        input_inverse, weight_inverse = input_scale.reciprocal(), weight_scale.reciprocal()
        out = torch._scaled_mm(
            x_fp8, w_fp8.t(), scale_a=input_inverse, scale_b=weight_inverse, out_dtype=x2d.dtype
        )
        ctx.save_for_backward(x_fp8, w_fp8, input_inverse, weight_inverse)
        ctx.grad_scaler, ctx.group = scalers["grad_output"], group
        ctx.input_dtype, ctx.weight_dtype = x2d.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, w_fp8, input_inverse, weight_inverse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_scale = ctx.grad_scaler.compute_scale(grad_out, ctx.group)
        g_fp8 = _cast_fp8(grad_out, grad_scale, ctx.grad_scaler.format)
        grad_inverse = grad_scale.reciprocal()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch._scaled_mm(
                g_fp8, _column_major(w_fp8), scale_a=grad_inverse, scale_b=weight_inverse,
                out_dtype=ctx.input_dtype,
            )
        if ctx.needs_input_grad[1]:
            grad_weight = torch._scaled_mm(
                g_fp8.t().contiguous(), _column_major(x_fp8), scale_a=grad_inverse,
                scale_b=input_inverse, out_dtype=ctx.weight_dtype,
            )
        return grad_input, grad_weight, None, None


def load_transformer_engine():
    """Import ``transformer_engine.pytorch`` and its recipe module, or explain how to install it."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe as te_recipe
    except ImportError as error:
        raise ConfigError(
            "quant.backend: 'transformer_engine' needs Transformer Engine, which is not installed; "
            "install the gpu extra (pip install 'osp-megatron[gpu]') or use backend 'auto'/'scaled_mm'"
        ) from error
    return te, te_recipe


def to_transformer_engine_recipe(recipe):
    """The Transformer Engine recipe equivalent to an FP8 ``recipe`` of this package."""
    _, te_recipe = load_transformer_engine()
    te_format = {"e4m3": te_recipe.Format.E4M3, "hybrid": te_recipe.Format.HYBRID}[recipe.format]
    if recipe.delayed:
        return te_recipe.DelayedScaling(
            margin=recipe.margin,
            fp8_format=te_format,
            amax_history_len=recipe.amax_history_len,
            amax_compute_algo=recipe.amax_compute_algo,
        )
    return te_recipe.Float8CurrentScaling(fp8_format=te_format)


class TransformerEngineGemm:
    """The local GEMM of one linear layer run by a ``te.Linear`` that shares the layer's weight.

    Transformer Engine keeps its own scaling state in that module, so the TensorScalers of the
    layer are unused on this path.  Not hardware-tested here (no TE on the test machines).
    """

    def __init__(self, weight: torch.Tensor, recipe):
        self.te, _ = load_transformer_engine()
        out_features, in_features = weight.shape
        self.linear = self.te.Linear(
            in_features, out_features, bias=False, params_dtype=weight.dtype, device=weight.device
        )
        self.te_recipe = to_transformer_engine_recipe(recipe)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
        if self.linear.weight is not weight:
            del self.linear.weight
            self.linear.weight = weight
        with self.te.fp8_autocast(enabled=True, fp8_recipe=self.te_recipe, fp8_group=group):
            return self.linear(x)


_npu_cast: Optional[Dict[str, Callable]] = None
_npu_cast_checked = False


def _load_npu_hif8_cast() -> Optional[Dict[str, Callable]]:
    global _npu_cast, _npu_cast_checked
    if not _npu_cast_checked:
        _npu_cast_checked = True
        try:
            import torch_npu

            if hasattr(torch_npu._C, "_cd_init"):
                torch_npu._C._cd_init()
            extension = torch_npu._C._cd
            _npu_cast = {
                "to": lambda t: extension.cast_to_fp8(t, extension.DType.hifloat8),
                "from": lambda t: extension.cast_from_fp8(
                    t, extension.DType.hifloat8, extension.DType.float32
                ),
            }
        except (ImportError, AttributeError, RuntimeError):
            _npu_cast = None
    return _npu_cast


def npu_native_hif8_round(x: torch.Tensor) -> Optional[torch.Tensor]:
    """HiF8 round trip through torch_npu's native hifloat8 cast, or None where that is unavailable.

    Not hardware-tested: written against torch_npu's HiFloat8 tensor utilities; its rounding of
    ties and overflow is the hardware's, which the emulation in hif8.py models.
    """
    cast = _load_npu_hif8_cast()
    if cast is None:
        return None
    flat = x.to(torch.float32).contiguous().view(1, -1)
    return cast["from"](cast["to"](flat)).view(x.shape).to(x.dtype)
