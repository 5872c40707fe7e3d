"""ModuleSpecs of the Wan DiT layer: which module fills each slot (linears, norms, attention core, MLP).

Swap `core_attention` to change how attention runs (e.g. Ulysses all-to-all) without touching the layer.
"""

from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from osp_megatron.models.wan.layers import (
    AttentionSubmodules,
    FullAttention,
    FusedBiasColumnParallelLinear,
    HeadShardedRMSNorm,
    WanAttention,
    WanDiTLayer,
    WanLayerSubmodules,
    WanMLP,
    WanMLPSubmodules,
)


def attention_spec(core_attention=FullAttention, is_cross: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=WanAttention,
        params={"is_cross": is_cross},
        submodules=AttentionSubmodules(
            linear_q=FusedBiasColumnParallelLinear,
            linear_k=FusedBiasColumnParallelLinear,
            linear_v=FusedBiasColumnParallelLinear,
            q_norm=HeadShardedRMSNorm,
            k_norm=HeadShardedRMSNorm,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
        ),
    )


def wan_layer_spec(self_attention_core=FullAttention, cross_attn_norm: bool = True) -> ModuleSpec:
    """The Wan2.1 block; `self_attention_core` is the swappable attention kernel module."""
    return ModuleSpec(
        module=WanDiTLayer,
        params={"cross_attn_norm": cross_attn_norm},
        submodules=WanLayerSubmodules(
            self_attention=attention_spec(self_attention_core),
            cross_attention=attention_spec(FullAttention, is_cross=True),
            mlp=ModuleSpec(
                module=WanMLP,
                submodules=WanMLPSubmodules(linear_fc1=FusedBiasColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
        ),
    )
