"""Construct the DiT for the current tensor-parallel size (real weights on a device, or shapes on meta).

Weights are initialised from the torch seed on the CPU so every tensor-parallel size gets the same model.
"""

import contextlib

import torch
from megatron.core import parallel_state

from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan.model import WanDiT, build_transformer_config
from osp_megatron.parallel.ledger import watch_tensor_parallel_linears


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give megatron linears' weights the tensor-parallel attributes megatron sets only while initialising.

    Column-parallel weights are split along dim 0, row-parallel ones along dim 1 (their biases are marked by
    megatron either way); checkpoints and the gradient norm read these attributes.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, ColumnParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def build_model(
    model_config: ModelConfig,
    device: torch.device | str = "cpu",
    meta: bool = False,
    layout_factory=None,
    layer_spec=None,
    initialize: bool = True,
) -> WanDiT:
    """The plain DiT for the current tensor-parallel size on `device` with fp32 (or model.params_dtype) weights;
    `meta=True` allocates nothing. Sequence parallelism, quantization, LoRA and FSDP are applied from outside
    (osp_megatron.engine.parallelize).

    `initialize=False` allocates the weights on `device` without initialising them (for a caller that
    overwrites every one, e.g. loading a checkpoint): no CPU initialisation of billions of weights first.
    """
    initialized = parallel_state.model_parallel_is_initialized()
    tp = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    perform_initialization = initialize and not meta
    config = build_transformer_config(
        model_config, tp, cpu_initialization=True, perform_initialization=perform_initialization
    )
    # Without initialisation nothing needs the CPU: allocate where the model will live.
    target = torch.device("meta") if meta else torch.device(device) if not initialize else None
    with target if target is not None else contextlib.nullcontext():
        model = WanDiT(model_config, config, layer_spec=layer_spec, layout_factory=layout_factory)
    if not perform_initialization:
        mark_tensor_parallel_weights(model)
    if not meta:
        model = model.to(device)
        watch_tensor_parallel_linears(model)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
