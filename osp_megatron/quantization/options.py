"""Names and checks of the quantization settings, free of torch so that configs load and fail fast.

Shared by the config (validation at load time) and the recipes (validation when built in code).
"""

from collections.abc import Iterable
from typing import Any

from osp_megatron.config.errors import ConfigError

# Recipe formats whose attention can run in FP8 (the gradients are E5M2 in both: E4M3 dP was measured unusable).
FP8_ATTENTION_FORMATS = ("hybrid", "e4m3")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")
BACKENDS = ("auto", "emulate", "scaled_mm", "transformer_engine")
# Which selected linears run their GEMMs in FP8 where the hardware path applies: the shapes measured faster, or all.
SELECTIONS = ("measured", "all")


def require_choice(value: Any, allowed: Iterable[Any], key: str) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def require_int(value: Any, minimum: int, key: str) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: got {value!r}; allowed: an integer >= {minimum}")


def require_bool(value: Any, key: str) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: got {value!r}; allowed: true or false")


def check_recipe_combination(recipe_format: str, stochastic: bool, backend: str, prefix: str) -> None:
    """Reject settings that do not fit the format: stochastic rounding and FP8-only backends."""
    if stochastic and recipe_format != "hif8":
        raise ConfigError(
            f"{prefix}.stochastic_grad_rounding: only allowed with the HiF8 format, got format {recipe_format!r}"
        )
    if backend in ("scaled_mm", "transformer_engine") and recipe_format == "hif8":
        raise ConfigError(f"{prefix}.backend: {backend!r} runs FP8 only; allowed with HiF8: 'auto', 'emulate'")
