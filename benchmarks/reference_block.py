"""A plain-PyTorch Wan2.1 block (torch.nn.Linear, eager element-wise ops, SDPA) for calibrating the DiT.

Same arithmetic as osp_megatron's block (AdaLN self-attention with q/k RMSNorm and 3D RoPE, cross-attention
to text, GELU-tanh FFN) with none of the framework: no megatron linears, no compiled pieces, no layouts.
Its time on a device is the yardstick the framework's full-attention block must meet or beat.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class PlainAttention(torch.nn.Module):
    def __init__(self, dim, heads, device, dtype):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim, device=device, dtype=dtype) for _ in range(4))
        self.norm_q = torch.nn.RMSNorm(dim, eps=1e-6, device=device, dtype=dtype)
        self.norm_k = torch.nn.RMSNorm(dim, eps=1e-6, device=device, dtype=dtype)

    def forward(self, x, source, rope=None):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.k(source)).unflatten(-1, (self.heads, -1))
        v = self.v(source).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        with sdpa_kernel(
            [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
            set_priority=True,
        ):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(-2))


def rotate(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2).type_as(x)


class PlainWanBlock(torch.nn.Module):
    def __init__(self, dim, heads, ffn_dim, device, dtype):
        super().__init__()
        self.self_attn = PlainAttention(dim, heads, device, dtype)
        self.cross_attn = PlainAttention(dim, heads, device, dtype)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6, device=device, dtype=torch.float32)
        self.ffn = torch.nn.Sequential(
            torch.nn.Linear(dim, ffn_dim, device=device, dtype=dtype),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(ffn_dim, dim, device=device, dtype=dtype),
        )
        self.modulation = torch.nn.Parameter(torch.randn(1, 6, dim, device=device) / dim**0.5)

    def forward(self, x, text, modulation, rope):
        shift, scale, gate, f_shift, f_scale, f_gate = (self.modulation + modulation.float()).chunk(6, dim=1)
        normed = (F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attn(normed, normed, rope).float() * gate).type_as(x)
        x = x + self.cross_attn(self.norm2(x.float()).type_as(x), text)
        normed = (F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + f_scale) + f_shift).type_as(x)
        return (x.float() + self.ffn(normed).float() * f_gate).type_as(x)


def plain_step(dim, heads, ffn_dim, tokens, text_len, device, dtype=torch.bfloat16):
    """A closure running forward + backward of one plain block on random inputs (no framework involved)."""
    from osp_megatron.attention.rope import rope_tables

    block = PlainWanBlock(dim, heads, ffn_dim, device, dtype)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)
    text = torch.randn(1, text_len, dim, device=device, dtype=dtype)
    modulation = torch.randn(1, 6, dim, device=device, dtype=torch.float32)
    rope = rope_tables((1, 1, tokens), dim // heads, 10000.0, device)

    def step():
        block(x, text, modulation, rope).float().square().mean().backward()

    return step
