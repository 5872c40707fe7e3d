"""8-bit quantized training: the HiF8 codec, FP8/HiF8 formats, scaling recipes and quantized linears.

See docs/quantization.md for the format tables, the recipes and the ``quant`` YAML keys.
"""

from osp_megatron.quantization.config import RECIPES, ModulesConfig, QuantConfig
from osp_megatron.quantization.formats import E4M3, E5M2, HIF8, FP8Format, Format, HiF8Format, get_format
from osp_megatron.quantization.hif8 import (
    HIF8_MAX,
    HIF8_MIN_DENORMAL,
    HIF8_MIN_NORMAL,
    hif8_decode,
    hif8_encode,
    hif8_finite_values,
    hif8_round,
    hif8_round_stochastic,
)
from osp_megatron.quantization.linear import (
    LinearQuantizationState,
    apply_quantization,
    load_quantization_state_dict,
    quantization_state_dict,
    quantized_autocast,
    quantized_matmul,
    quantized_modules,
    remove_quantization,
)
from osp_megatron.quantization.recipes import (
    ROLES,
    CurrentScaling,
    DelayedScaling,
    HiF8Recipe,
    Recipe,
    TensorScaler,
)

__all__ = [
    "CurrentScaling",
    "DelayedScaling",
    "E4M3",
    "E5M2",
    "FP8Format",
    "Format",
    "HIF8",
    "HIF8_MAX",
    "HIF8_MIN_DENORMAL",
    "HIF8_MIN_NORMAL",
    "HiF8Format",
    "HiF8Recipe",
    "LinearQuantizationState",
    "ModulesConfig",
    "QuantConfig",
    "RECIPES",
    "ROLES",
    "Recipe",
    "TensorScaler",
    "apply_quantization",
    "get_format",
    "hif8_decode",
    "hif8_encode",
    "hif8_finite_values",
    "hif8_round",
    "hif8_round_stochastic",
    "load_quantization_state_dict",
    "quantization_state_dict",
    "quantized_autocast",
    "quantized_matmul",
    "quantized_modules",
    "remove_quantization",
]
