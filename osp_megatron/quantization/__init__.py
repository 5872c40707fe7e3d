"""8-bit quantized training: the HiF8 codec, FP8/HiF8 formats, scaling recipes and quantized linears.

See docs/quantization.md for the format tables, the recipes and the ``quant`` YAML keys.
"""

from osp_megatron.utils.lazy import lazy_exports

_EXPORTS = {
    "RECIPES": "config",
    "ModulesConfig": "config",
    "QuantConfig": "config",
    "E4M3": "formats",
    "E5M2": "formats",
    "HIF8": "formats",
    "FP8Format": "formats",
    "Format": "formats",
    "HiF8Format": "formats",
    "get_format": "formats",
    "HIF8_MAX": "hif8",
    "HIF8_MIN_DENORMAL": "hif8",
    "HIF8_MIN_NORMAL": "hif8",
    "hif8_decode": "hif8",
    "hif8_encode": "hif8",
    "hif8_finite_values": "hif8",
    "hif8_round": "hif8",
    "hif8_round_stochastic": "hif8",
    "LinearQuantizationState": "linear",
    "apply_quantization": "linear",
    "load_quantization_state_dict": "linear",
    "quantization_state_dict": "linear",
    "quantized_autocast": "autocast",
    "quantized_matmul": "linear",
    "quantized_modules": "linear",
    "remove_quantization": "linear",
    "ROLES": "recipes",
    "CurrentScaling": "recipes",
    "DelayedScaling": "recipes",
    "HiF8Recipe": "recipes",
    "Recipe": "recipes",
    "TensorScaler": "recipes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
