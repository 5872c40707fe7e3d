"""One entry point for scaled dot-product attention that picks the best kernel on the device.

Layout everywhere is [batch, tokens, heads, head_dim]; an optional boolean key mask marks real keys.
"""

import torch
import torch.nn.functional as F


def dot_product_attention(q, k, v, key_padding_mask=None, backend="auto"):
    """softmax(q k^T / sqrt(d)) v with q [B, Nq, H, D], k and v [B, Nk, H, D] -> [B, Nq, H, D].

    key_padding_mask: optional bool [B or 1, Nk], True for keys that may be attended to.
    """
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
