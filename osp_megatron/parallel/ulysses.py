"""Ulysses attention core for the layer spec: sequence gathered and heads scattered over a group, and back.

Swapped into `wan_layer_spec(self_attention_core=UlyssesAttention)`; the layout's context names the group.
"""

import torch

from osp_megatron.attention.context import AttentionContext, attend_in_layout
from osp_megatron.attention.skiparse import skiparse_attention_sparse_layout
from osp_megatron.parallel.collectives import heads_to_sequence, sequence_to_heads
from osp_megatron.quantization.attention import attention_kernel


def attend_local(q, k, v, context: AttentionContext, kernel=None):
    """attend_in_layout, also leaving out padded keys when one full sequence holds padding (key_runs)."""
    if context.key_runs is None or context.subsequences > 1:
        return attend_in_layout(q, k, v, context, kernel)
    return skiparse_attention_sparse_layout(q, k, v, backend=context.backend, key_runs=context.key_runs)


class UlyssesAttention(torch.nn.Module):
    """Self-attention core over tokens spread across `context.sequence_group` (DeepSpeed-Ulysses scheme).

    q, k, v [B, runs * n, heads, head_dim] hold this rank's chunk of each of `context.subsequences` runs; one
    all-to-all each gathers whole runs for heads/G heads, dense attention runs inside every run, and one
    all-to-all returns the output to the sequence split. Without a group it is the local FullAttention core.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__()

    def forward(self, q, k, v, context: AttentionContext):
        group = getattr(context, "sequence_group", None)
        if group is None:
            return attend_local(q, k, v, context, attention_kernel(self))
        name, runs = context.group_name, context.subsequences
        q, k, v = (sequence_to_heads(t, group, name, runs) for t in (q, k, v))
        out = attend_local(q, k, v, context, attention_kernel(self))
        return heads_to_sequence(out, group, name, runs)
