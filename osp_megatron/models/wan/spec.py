"""ModuleSpecs of the Wan DiT layer: which module fills each slot (linears, norms, attention core, MLP).

Swap `core_attention` to change how attention runs (e.g. Ulysses all-to-all) without touching the layer.
"""

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from osp_megatron.models.wan.layers import (
    AttentionSubmodules,
    FullAttention,
    HeadShardedRMSNorm,
    WanAttention,
    WanDiTLayer,
    WanLayerSubmodules,
)


def attention_spec(core_attention=FullAttention, is_cross: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=WanAttention,
        params={"is_cross": is_cross},
        submodules=AttentionSubmodules(
            linear_q=ColumnParallelLinear,
            linear_k=ColumnParallelLinear,
            linear_v=ColumnParallelLinear,
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
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
        ),
    )
