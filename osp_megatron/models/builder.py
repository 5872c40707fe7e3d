"""Construct the DiT for the current parallel layout (real weights on a device, or shapes on meta).

Weights are initialised from the torch seed on the CPU so every tensor-parallel size gets the same model.
"""

import contextlib

import torch
from megatron.core import parallel_state

from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan.model import WanDiT, build_transformer_config


def build_model(model_config: ModelConfig, device: torch.device | str = "cpu", meta: bool = False,
                layout_factory=None, layer_spec=None) -> WanDiT:
    """The DiT on `device` with fp32 (or model.params_dtype) weights; `meta=True` allocates nothing."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    config = build_transformer_config(model_config, tp, cpu_initialization=True, perform_initialization=not meta)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = WanDiT(model_config, config, layer_spec=layer_spec, layout_factory=layout_factory)
    if not meta:
        model = model.to(device)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
