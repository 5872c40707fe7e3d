"""Construct the DiT for the current parallel layout (real weights on a device, or shapes on meta).

Weights are initialised from the torch seed on the CPU so every tensor-parallel size gets the same model.
"""

import contextlib
import functools

import torch
from megatron.core import parallel_state

from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan.model import WanDiT, build_transformer_config
from osp_megatron.models.wan.spec import wan_layer_spec
from osp_megatron.parallel import state
from osp_megatron.parallel.ledger import watch_tensor_parallel_linears


def sequence_parallel_parts(model_config: ModelConfig):
    """(layout_factory, layer_spec) for the current S x U sequence-parallel groups, or (None, None) without."""
    from osp_megatron.parallel.ssp import SequenceParallelTokenLayout, check_heads, uses_sparse_order
    from osp_megatron.parallel.ulysses import UlyssesAttention

    groups = state.sequence_parallel_groups()
    if groups.context_size == 1:
        return None, None
    kinds = model_config.block_kinds()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_heads(model_config.num_heads, tp, groups.ssp_size, groups.ulysses_size, full_layers="full" in kinds,
                sparse_layers=uses_sparse_order(model_config.sparse_ratio, kinds))
    factory = functools.partial(SequenceParallelTokenLayout, groups=groups, block_kinds=tuple(kinds))
    spec = wan_layer_spec(self_attention_core=UlyssesAttention, cross_attn_norm=model_config.cross_attn_norm)
    return factory, spec


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


def build_model(model_config: ModelConfig, device: torch.device | str = "cpu", meta: bool = False,
                layout_factory=None, layer_spec=None, initialize: bool = True) -> WanDiT:
    """The DiT on `device` with fp32 (or model.params_dtype) weights; `meta=True` allocates nothing.

    `initialize=False` allocates the weights on `device` without initialising them (for a caller that
    overwrites every one, e.g. loading a checkpoint): no CPU initialisation of billions of weights first.
    Under sequence parallelism (parallel.ssp x parallel.ulysses > 1) the token layout and the attention core
    default to SequenceParallelTokenLayout and UlyssesAttention.
    """
    initialized = parallel_state.model_parallel_is_initialized()
    tp = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
    if initialized:
        sequence_factory, sequence_spec = sequence_parallel_parts(model_config)
        layout_factory = layout_factory or sequence_factory
        layer_spec = layer_spec or sequence_spec
    perform_initialization = initialize and not meta
    config = build_transformer_config(model_config, tp, cpu_initialization=True,
                                      perform_initialization=perform_initialization)
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
