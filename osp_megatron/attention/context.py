"""The attention-layout contract: how the tokens a rank holds are grouped for the self-attention core.

Token layouts (parallel/layout.py, parallel/ssp.py) produce an AttentionContext; attention cores consume it.
"""

import functools
from dataclasses import dataclass

import torch

from osp_megatron.attention.dispatch import dot_product_attention
from osp_megatron.attention.skiparse import skiparse_attention_sparse_layout


@dataclass
class AttentionContext:
    """How the tokens a rank holds are laid out, as far as the self-attention core must know.

    In a sparse (Skiparse) layout the N tokens of a sample are `subsequences` equal runs, each attending only
    within itself; everything else in a block is per-token, so only the attention core looks at this.
    """

    subsequences: int = 1
    key_runs: list | None = None  # real_key_runs() of the padded layout; None when nothing is padded
    backend: str = "auto"
    # Packed layout (no padding tokens): the token counts of the consecutive subsequences of a sample, which
    # then may differ; None when all subsequences have N / subsequences tokens.
    lengths: tuple | None = None


def equal_length_groups(lengths) -> list:
    """[(length, count)] of consecutive runs of equal subsequence lengths, in order."""
    groups = []
    for length in lengths:
        if groups and groups[-1][0] == length:
            groups[-1][1] += 1
        else:
            groups.append([length, 1])
    return [tuple(group) for group in groups]


def attend_packed(q, k, v, lengths, backend="auto", kernel=None):
    """Attention inside consecutive subsequences of the given lengths; one kernel call per run of equal lengths.

    kernel: the attention function (q, k, v) -> out to call (e.g. FP8 attention); default the 16-bit one.
    """
    attend = kernel or functools.partial(dot_product_attention, backend=backend)
    groups = equal_length_groups(lengths)
    sizes = [length * count for length, count in groups]
    if sum(sizes) != q.shape[1]:
        raise ValueError(f"subsequence lengths sum to {sum(sizes)} but q holds {q.shape[1]} tokens")
    outputs = []
    for (length, count), q_g, k_g, v_g in zip(groups, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)):
        batched = [t.reshape(t.shape[0] * count, length, *t.shape[2:]) for t in (q_g, k_g, v_g)]
        out = attend(*batched)
        outputs.append(out.reshape(q.shape[0], length * count, *out.shape[2:]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def attend_in_layout(q, k, v, context: AttentionContext, kernel=None):
    """Dense attention inside each subsequence of q, k, v [B, N, heads, head_dim] -> [B, N, heads, head_dim].

    kernel: the attention function (q, k, v) -> out for unpadded runs (e.g. FP8 attention); padded
    layouts (key_runs) keep the 16-bit kernel, which leaves the padded keys out.
    """
    if context.lengths is not None:
        return attend_packed(q, k, v, context.lengths, context.backend, kernel)
    count = context.subsequences
    attend = kernel or functools.partial(dot_product_attention, backend=context.backend)
    if count == 1:
        return attend(q, k, v)
    split = [q.shape[0] * count, q.shape[1] // count, *q.shape[2:]]
    if context.key_runs is None:
        return attend(q.reshape(split), k.reshape(split), v.reshape(split)).reshape(q.shape)
    out = skiparse_attention_sparse_layout(
        q.reshape(split), k.reshape(split), v.reshape(split), backend=context.backend, key_runs=context.key_runs
    )
    return out.reshape(q.shape)
