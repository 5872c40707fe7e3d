"""LoRA adapters (PEFT) on the DiT's megatron-core tensor-parallel linears, and the base model as reference.

PEFT's LoRA layer for megatron linears is used through PEFT's custom-module registration, adapted to
megatron's (output, bias) return value; adapters are initialised from full-size tensors, so every
tensor-parallel size and FSDP sharding starts from the same adapters (docs/engine.md).
"""

import contextlib
import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import copy_slice_into, local_tensor


def _output(result):
    """The tensor of a megatron linear's (output, bias) result, or a plain linear's output."""
    return result[0] if isinstance(result, tuple) else result


def _lora_parallel_linear_class():
    from peft.tuners.lora.tp_layer import LoraParallelLinear

    class MegatronLoraLinear(LoraParallelLinear):
        """PEFT's LoRA layer around a ColumnParallelLinear (B split like the outputs) or RowParallelLinear
        (A split like the inputs); returns (output, bias) like the layer it wraps."""

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            megatron_config = dataclasses.replace(base_layer.config, perform_initialization=False)
            super().__init__(
                base_layer,
                adapter_name,
                config=config,
                backend=tensor_parallel,
                r=kwargs["r"],
                lora_alpha=kwargs["lora_alpha"],
                megatron_config=megatron_config,
            )

        def update_layer(self, adapter_name, *args, **kwargs):
            self.lora_bias[adapter_name] = False  # megatron-wrapped adapters carry no bias
            super().update_layer(adapter_name, *args, **kwargs)

        @torch.no_grad()
        def initialise_tensor_parallel_invariant(self, adapter_name="default"):
            """A drawn at full size from the torch seed and sliced for this rank (B = 0): the adapters of
            every tensor-parallel size (and every FSDP sharding) are pieces of one matrix."""
            lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            full = torch.empty(self.r[adapter_name], self.in_features)
            torch.nn.init.kaiming_uniform_(full, a=5**0.5)
            if self.is_parallel_a:
                full = full.chunk(state.tensor_parallel_size(), dim=1)[state.tensor_parallel_rank()]
            copy_slice_into(lora_a, full)
            local_tensor(lora_b).zero_()

        def forward(self, x, *args, **kwargs):
            result, bias = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result, bias
            dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                hidden = _output(self.lora_A[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
                result = result + _output(self.lora_B[name](hidden)) * self.scaling[name]
            return result.to(dtype), bias

    return MegatronLoraLinear


def apply_lora(
    model: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], seed: int | None = 0
) -> list[str]:
    """Inject adapters into `model` in place (base weights frozen, adapters trainable); returns the adapted
    module names. Raises ConfigError when `target_modules` matches no linear.

    seed: initialise the adapters from it (initialise_adapters); None leaves them unset, for a model on the
    meta device whose adapters are initialised once it is materialised.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from osp_megatron.models.builder import mark_tensor_parallel_weights

    layer = _lora_parallel_linear_class()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    config._register_custom_module({ColumnParallelLinear: layer, RowParallelLinear: layer})
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules={list(target_modules)}: {err}") from None
    adapted = [name for name, module in model.named_modules() if isinstance(module, layer)]
    if not adapted:
        raise ConfigError(f"lora.target_modules={list(target_modules)} matches no linear of the model")
    mark_tensor_parallel_weights(model)  # the adapters' megatron halves
    if seed is not None:
        initialise_adapters(model, seed)
    return adapted


def initialise_adapters(model: torch.nn.Module, seed: int) -> None:
    """Draw every adapter anew from `seed` (A random, B zero: the model starts as its base), layer by layer in
    module order, whatever the parallel layout; run after an adapted model is materialised."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for layer in lora_layers(model):
            layer.initialise_tensor_parallel_invariant()
    finally:
        torch.set_rng_state(generator_state)


def base_weight_names(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name in the adapted model: its name in the plain DiT} for every base (non-adapter) weight:
    what a base checkpoint is read into."""
    return {name: name.replace(".base_layer.", ".") for name, _ in model.named_parameters() if "lora_" not in name}


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapter parameters (what a LoRA checkpoint stores)."""
    return [name for name, _ in model.named_parameters() if "lora_" in name]


def lora_layers(model: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model` as its base weights (the frozen reference policy): no second copy of the model."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight and put the base linear back: the plain DiT (same parameter
    names as a pretraining model), for export and sampling."""
    adapted = set(lora_layers(model))
    for name, module in list(model.named_modules()):
        if module in adapted:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
