"""Hardware GEMM paths for quantized linears: FP8 torch._scaled_mm on SM90, Transformer Engine, Ascend.

Each is optional: callers ask whether it applies and fall back to quantize-dequantize emulation.
"""

from collections.abc import Callable

import torch

from osp_megatron.config.errors import ConfigError

SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm needs every GEMM dimension to be a multiple of 16
SCALED_MM_FORMATS = ("e4m3", "hybrid")  # E5M2 x E5M2 GEMMs are not supported by the hardware


def scaled_mm_applies(recipe_format: str, x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the FP8 GEMMs of ``x2d @ weight.T`` and its gradients can run on torch._scaled_mm.

    The feature dimensions must be multiples of 16; the token count need not be: the quantized GEMM pads the
    codes with zero rows (``TensorScaler.encode``'s row_multiple), which changes no amax and no product.
    """
    if recipe_format not in SCALED_MM_FORMATS or not x2d.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x2d.device) < (9, 0):
        return False
    return all(dim % SCALED_MM_ALIGNMENT == 0 for dim in (x2d.shape[1], weight.shape[0]))


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


_npu_cast: dict[str, Callable] | None = None
_npu_cast_checked = False


def _load_npu_hif8_cast() -> dict[str, Callable] | None:
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
                "from": lambda t: extension.cast_from_fp8(t, extension.DType.hifloat8, extension.DType.float32),
            }
        except (ImportError, AttributeError, RuntimeError):
            _npu_cast = None
    return _npu_cast


def npu_native_hif8_round(x: torch.Tensor) -> torch.Tensor | None:
    """HiF8 round trip through torch_npu's native hifloat8 cast, or None where that is unavailable.

    Not hardware-tested: written against torch_npu's HiFloat8 tensor utilities; its rounding of
    ties and overflow is the hardware's, which the emulation in hif8.py models.
    """
    cast = _load_npu_hif8_cast()
    if cast is None:
        return None
    flat = x.to(torch.float32).contiguous().view(1, -1)
    return cast["from"](cast["to"](flat)).view(x.shape).to(x.dtype)
