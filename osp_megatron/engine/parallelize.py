"""The one place a built DiT becomes the model a job runs, applied from outside the model in a fixed order.

Token layout (SSP / Ulysses), quantization (training or inference form), LoRA adapters, activation
checkpointing, compilation, FSDP: osp-train, osp-grpo, osp-sample, osp-eval, osp-ckpt and the benchmarks all
come through parallelize_dit (docs/engine.md).
"""

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from megatron.core import parallel_state

from osp_megatron.config.errors import ConfigError
from osp_megatron.models.wan.layers import FullAttention
from osp_megatron.models.wan.model import WanDiT
from osp_megatron.parallel import state
from osp_megatron.parallel.config import ParallelConfig
from osp_megatron.parallel.fsdp import apply_fsdp
from osp_megatron.parallel.ssp import SequenceParallelTokenLayout, check_heads, uses_sparse_order
from osp_megatron.parallel.ulysses import UlyssesAttention
from osp_megatron.quantization.config import QuantConfig

# What the model is for: "train" (gradients for its trainable weights), "frozen" (forward passes with the
# training layout but no gradients, e.g. GRPO's reference policy), "inference" (sampling: no FSDP, no
# recomputation, weights quantized once).
Role = Literal["train", "frozen", "inference"]


@dataclass
class Parallelized:
    """What parallelize_dit applied: quantized layer names, LoRA-adapted linears, whether FSDP shards it."""

    quantized: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    fsdp: bool = False
    sequence_parallel: bool = False


def apply_token_layout(model: WanDiT) -> bool:
    """Hold each sample's tokens over the SSP x Ulysses ranks of the current layout: the sequence-parallel
    token layout and the Ulysses attention core in every self-attention (True), or nothing without
    sequence parallelism (False). Needs the process groups (parallel.state.init_distributed)."""
    groups = state.sequence_parallel_groups()
    if groups.context_size == 1:
        return False
    config = model.model_config
    kinds = config.block_kinds()
    check_heads(
        config.num_heads,
        state.tensor_parallel_size(),
        groups.ssp_size,
        groups.ulysses_size,
        full_layers="full" in kinds,
        sparse_layers=uses_sparse_order(config.sparse_ratio, kinds),
    )
    model.layout_factory = functools.partial(SequenceParallelTokenLayout, groups=groups, block_kinds=tuple(kinds))
    for block in model.blocks:
        # The local core becomes the Ulysses core; a core of the caller's own (a layer spec's) is kept.
        if type(block.self_attention.core_attention) is FullAttention:
            block.self_attention.core_attention = UlyssesAttention()
    return True


def check_fsdp_role(role: Role) -> None:
    if role == "inference":
        raise ConfigError(
            "parallel.fsdp shards a model for training; sampling holds whole replicas "
            "(parallel.tensor / ssp / ulysses split a model for sampling): set parallel.fsdp=false"
        )


def apply_compilation(model: WanDiT) -> None:
    """torch.compile every block (one graph per block shape, reused across blocks of the same kind)."""
    for block in model.blocks:
        block.compile()


def parallelize_dit(
    model: WanDiT,
    role: Role = "train",
    *,
    parallel: ParallelConfig | None = None,
    quant: QuantConfig | None = None,
    lora=None,
    lora_seed: int | None = 0,
    activation_checkpointing: str | None = None,
    compile: bool = False,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Parallelized:
    """Turn a built DiT (real or on the meta device) into the model a job runs, in place.

    In order: the token layout of the current SSP x Ulysses groups; quantization of the selected linears and
    attention cores (`quant`; training form, or for role "inference" weights quantized once on first use);
    LoRA adapters (`lora`: a LoraConfig; trainable, base frozen; lora_seed None leaves them for
    engine.lora.initialise_adapters once the model is materialised); activation checkpointing (None keeps
    model.activation_checkpointing; "none" for inference); compilation of the blocks; FSDP over the data x
    SSP x Ulysses ranks (`parallel.fsdp`, with its offload and reduce dtype; compute_dtype is the dtype the
    blocks gather in).
    """
    parallel = parallel or ParallelConfig()
    done = Parallelized()
    if state.sequence_parallel_groups() is not None:
        done.sequence_parallel = apply_token_layout(model)
    if quant is not None and quant.enabled:
        from osp_megatron.quantization import apply_quantization

        group = state.amax_reduction_group() if parallel_state.model_parallel_is_initialized() else None
        done.quantized = apply_quantization(model, quant, amax_reduction_group=group, inference=role == "inference")
        if not done.quantized:
            raise ConfigError(f"quant.modules.include={quant.modules.include} selects no linear layer")
    if lora is not None:
        from osp_megatron.engine.lora import apply_lora

        done.adapted = apply_lora(model, lora.rank, lora.alpha, lora.target_modules, seed=lora_seed)
    if role == "inference":
        model.activation_checkpointing = "none"
        model.requires_grad_(False)
    elif activation_checkpointing is not None:
        model.activation_checkpointing = activation_checkpointing
    if role == "frozen":
        model.requires_grad_(False)
    if compile:
        apply_compilation(model)
    if parallel.fsdp:
        check_fsdp_role(role)
        apply_fsdp(model, parallel.fsdp_reduce_dtype, compute_dtype, parallel.fsdp_offload, device)
        done.fsdp = True
    return done
