"""Typed configuration of quantized training (the ``quant`` section of a training YAML).

``QuantConfig.validate`` names the offending dotted key; ``build_recipe`` turns the config into a Recipe.
"""

from dataclasses import dataclass, field

from osp_megatron.config.errors import ConfigError
from osp_megatron.quantization.options import (
    AMAX_COMPUTE_ALGOS,
    BACKENDS,
    FP8_ATTENTION_FORMATS,
    SELECTIONS,
    check_recipe_combination,
    require_bool,
    require_choice,
    require_int,
)

# recipe name -> (format, delayed scaling?)
RECIPES = {
    "none": (None, False),
    "hif8": ("hif8", False),
    "hif8_delayed": ("hif8", True),
    "fp8_e4m3": ("e4m3", False),
    "fp8_hybrid": ("hybrid", False),
    "fp8_delayed": ("hybrid", True),
}


@dataclass
class ModulesConfig:
    """Which linear layers are quantized, by qualified module name (fnmatch patterns).

    A layer is quantized when its name matches some ``include`` pattern and no ``exclude`` pattern;
    the defaults keep embeddings, norms and the output head in high precision.
    """

    include: list[str] = field(default_factory=lambda: ["blocks.*"])
    exclude: list[str] = field(default_factory=lambda: ["*embed*", "*norm*", "head*"])


@dataclass
class QuantConfig:
    """Quantized GEMMs for the linear layers of the model.

    recipe: "none" | "hif8" | "hif8_delayed" | "fp8_e4m3" | "fp8_hybrid" | "fp8_delayed".
    margin, amax_history_len, amax_compute_algo: scaling parameters (history ones: delayed recipes).
    stochastic_grad_rounding: hybrid stochastic rounding of output gradients (HiF8 recipes only).
    backend: "auto" | "emulate" | "scaled_mm" | "transformer_engine".
    select: "measured" | "all". Where a layer's GEMMs run as real FP8 (torch._scaled_mm on SM90), "measured"
        keeps FP8 only for the GEMM shapes that a timing on the device, at their first call, found faster than
        bf16 (the choices are printed by the job), and FP8 emulated on a GPU competes the same way; "all" runs
        every selected layer in FP8. HiF8 and FP8 on the CPU quantize every selected layer either way.
    attention: also run the self-attention cores in FP8 (cuDNN FP8 attention on SM90+ GPUs with
        nvidia-cudnn-frontend; elsewhere the 16-bit kernel runs). FP8 recipes only.
    """

    recipe: str = "none"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    stochastic_grad_rounding: bool = False
    modules: ModulesConfig = field(default_factory=ModulesConfig)
    backend: str = "auto"
    select: str = "measured"
    attention: bool = False

    @property
    def enabled(self) -> bool:
        return self.recipe != "none"

    def validate(self, prefix: str = "quant") -> None:
        """Raise ConfigError naming ``prefix.key`` and the allowed values for the first bad entry."""
        require_choice(self.recipe, RECIPES, f"{prefix}.recipe")
        require_int(self.margin, 0, f"{prefix}.margin")
        require_int(self.amax_history_len, 1, f"{prefix}.amax_history_len")
        require_choice(self.amax_compute_algo, AMAX_COMPUTE_ALGOS, f"{prefix}.amax_compute_algo")
        require_bool(self.stochastic_grad_rounding, f"{prefix}.stochastic_grad_rounding")
        require_choice(self.backend, BACKENDS, f"{prefix}.backend")
        require_choice(self.select, SELECTIONS, f"{prefix}.select")
        require_bool(self.attention, f"{prefix}.attention")
        if self.attention and RECIPES[self.recipe][0] not in FP8_ATTENTION_FORMATS:
            raise ConfigError(
                f"{prefix}.attention: FP8 attention needs an FP8 recipe (fp8_e4m3, fp8_hybrid, fp8_delayed), "
                f"got recipe {self.recipe!r}"
            )
        if not isinstance(self.modules, ModulesConfig):
            raise ConfigError(f"{prefix}.modules: got {self.modules!r}; allowed: a mapping with include/exclude")
        for name in ("include", "exclude"):
            patterns = getattr(self.modules, name)
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"{prefix}.modules.{name}: got {patterns!r}; allowed: a list of fnmatch patterns")
        recipe_format, _ = RECIPES[self.recipe]
        if recipe_format is not None:
            check_recipe_combination(recipe_format, self.stochastic_grad_rounding, self.backend, prefix)
        elif self.stochastic_grad_rounding:
            raise ConfigError(f"{prefix}.stochastic_grad_rounding: needs a HiF8 recipe, got recipe 'none'")

    def build_recipe(self):
        """The recipe this config describes (validated), or None for recipe "none"."""
        from osp_megatron.quantization.recipes import CurrentScaling, DelayedScaling, HiF8Recipe

        self.validate()
        recipe_format, delayed = RECIPES[self.recipe]
        if recipe_format is None:
            return None
        common = dict(
            margin=self.margin,
            stochastic_grad_rounding=self.stochastic_grad_rounding,
            backend=self.backend,
            select=self.select,
        )
        if delayed:
            return DelayedScaling(
                format=recipe_format,
                amax_history_len=self.amax_history_len,
                amax_compute_algo=self.amax_compute_algo,
                **common,
            )
        if recipe_format == "hif8":
            return HiF8Recipe(**common)
        return CurrentScaling(format=recipe_format, **common)
