"""Fewer passes over memory in the Wan VAE encoder: fused RMS norm + SiLU, convolution-side spatial padding.

At 480P the encoder's first stages hold 96-channel activations of 1.6 GB per 20-frame chunk, and most of its time
is spent moving them: diffusers' ``WanRMS_norm`` followed by SiLU is about eight elementwise passes (a float32
copy, the norm, the division, the cast back, the scale, the gain, the bias, the activation), and every causal
convolution pads its input with ``F.pad`` (a full copy) on top of the ``torch.cat`` with the cached frames.
``fused_encoder_pieces`` swaps in, for the duration of an encode, (a) one computation for norm + SiLU (compiled
into a single kernel on CUDA: one read, one write), and (b) causal convolutions that pad only in time and let the
convolution kernel pad height and width itself. The arithmetic is the same (zero padding either way; the norm in
float32 rounded once instead of after each step), so latents agree with diffusers' to float64 rounding.
Nothing is changed outside the ``with`` block: module attributes are put back, state-dict keys never change.
"""

import contextlib
import types

import torch
import torch.nn.functional as F

from osp_megatron.quantization.kernels import fused_on_cuda

NORMALIZE_EPS = 1e-12  # F.normalize's default, which WanRMS_norm uses


@fused_on_cuda
def _rms_norm_silu(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(x / max(||x||, eps) * gain + bias) over dim 1, computed in float32 (or x's wider dtype)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    work = x.to(compute)
    norm = torch.linalg.vector_norm(work, dim=1, keepdim=True).clamp_min(NORMALIZE_EPS)
    out = work / norm * gain.to(compute)
    if bias is not None:
        out = out + bias.to(compute)
    return F.silu(out).to(x.dtype)


def rms_norm_silu(x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(x / max(||x||_channels, eps) * gain + bias) over dim 1 of a 5-D ``x`` [B, C, T, H, W], computed in
    float32 (or x's wider dtype), in x's dtype and memory format. ``gain`` is WanRMS_norm's ``scale * gamma``.

    The kernel gets a plain matrix [B*T*H*W, C] (channels-last-3d) or a [B, C, T*H*W] block (contiguous), so
    that one compiled graph serves every stage, chunk length and batch size of the encoder (a 5-D input would
    need one per combination of unit batch, unit frame count and stride pattern, past torch._dynamo's limit).
    """
    batch, channels = x.shape[:2]
    rows_layout = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    shape = (channels,) if rows_layout else (channels, 1)
    gain, bias = gain.reshape(shape), None if bias is None else bias.reshape(shape)
    if rows_layout:
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, channels)  # channels innermost: a view
        out = _rms_norm_silu(rows, gain, bias)
        return out.reshape(batch, *x.shape[2:], channels).permute(0, 4, 1, 2, 3)
    out = _rms_norm_silu(x.contiguous().reshape(batch, channels, -1), gain, bias)
    return out.reshape(x.shape)


class _NormSiLU(torch.nn.Module):
    """A WanRMS_norm (channel-first) with the SiLU after it folded in."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        norm = self.norm  # its bias is a tensor or 0 (_norm_then_silu_pairs wraps no other)
        bias = norm.bias if isinstance(norm.bias, torch.Tensor) else None
        return rms_norm_silu(x, norm.gamma * norm.scale, bias)


def _causal_conv3d_forward(self, x, cache_x=None):
    """WanCausalConv3d.forward with the height / width padding done by the convolution instead of F.pad."""
    time_padding = self._padding[4]
    if cache_x is not None and time_padding > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        time_padding -= cache_x.shape[2]
    if time_padding != 0:  # negative crops, as in diffusers (a cache longer than the padding)
        x = F.pad(x, (0, 0, 0, 0, time_padding, 0))
    spatial = (0, self._padding[2], self._padding[0])  # _padding is (w, w, h, h, 2 t, 0) in F.pad order
    return F.conv3d(x, self.weight, self.bias, self.stride, spatial, self.dilation, self.groups)


def _norm_then_silu_pairs(encoder):
    """(owner, norm attribute) of every channel-first WanRMS_norm that the encoder follows with its SiLU."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock, WanRMS_norm

    def fusable(norm, activation):
        return (
            isinstance(norm, WanRMS_norm)
            and norm.channel_first
            and isinstance(activation, torch.nn.SiLU)
            and (isinstance(norm.bias, torch.Tensor) or norm.bias == 0)
        )

    pairs = []
    for module in encoder.modules():
        if isinstance(module, WanResidualBlock) and fusable(module.norm1, module.nonlinearity):
            if fusable(module.norm2, module.nonlinearity):
                pairs.append((module, ("norm1", "norm2")))
    if fusable(getattr(encoder, "norm_out", None), getattr(encoder, "nonlinearity", None)):
        pairs.append((encoder, ("norm_out",)))
    return pairs


@contextlib.contextmanager
def fused_encoder_pieces(encoder):
    """Within the block, ``encoder`` (a diffusers WanEncoder3d) runs the fused norm + SiLU and the causal
    convolutions without their own spatial padding copy."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    restore = []
    try:
        for owner, names in _norm_then_silu_pairs(encoder):
            for name in names:
                restore.append((owner, name, owner._modules[name]))
                owner._modules[name] = _NormSiLU(owner._modules[name])
            restore.append((owner, "nonlinearity", owner._modules["nonlinearity"]))
            owner._modules["nonlinearity"] = torch.nn.Identity()
        for module in encoder.modules():
            if isinstance(module, WanCausalConv3d) and module.padding_mode == "zeros":
                module.forward = types.MethodType(_causal_conv3d_forward, module)
                restore.append((module, None, None))
        yield encoder
    finally:
        for owner, name, original in reversed(restore):
            if name is None:
                del owner.forward
            else:
                owner._modules[name] = original
