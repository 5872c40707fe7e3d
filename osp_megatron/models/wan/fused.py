"""Element-wise pieces of the Wan block, fused by torch.compile on accelerators and eager on the CPU.

At 80k tokens each unfused float32 pass over the hidden states costs about a millisecond; the AdaLN
modulation, gated residuals, q/k RMSNorm, RoPE and GELU otherwise take as long as the GEMMs.

Pieces that follow one another in the block are compiled as one function with several outputs where a
tensor feeds two consumers (a residual stream and the norm after it): the compiled backward then adds the two
gradient paths inside its kernel instead of autograd adding them in a pass of their own.
"""

import torch
import torch.nn.functional as F

from osp_megatron.utils.compile import accelerator_compiled


def per_sample(p: torch.Tensor) -> torch.Tensor:
    """[B, 1, D] modulation -> [B, D], or [D] when B == 1.

    Size-1 dimensions are kept out of the compiled graphs: the compiled backward may return their gradient
    with those dimensions dropped, which autograd then rejects.
    """
    return p.reshape(p.shape[-1]) if p.shape[0] == 1 else p.reshape(p.shape[0], p.shape[-1])


def _as_broadcast(p: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(1) if p.dim() == 2 else p


# The arithmetic of each piece, shared by the compiled functions that run it alone or followed by the next piece.


def _modulated_norm(x, shift, scale, eps: float):
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + _as_broadcast(scale)) + _as_broadcast(shift)).to(x.dtype)


def _affine_norm(x, weight, bias, eps: float):
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def _gated_sum(x, update, gate, bias):
    update = update.float() if bias is None else update.float() + bias.float()
    return (x.float() + update * _as_broadcast(gate)).to(x.dtype)


def _sum(x, update, bias):
    if bias is None:
        return x + update
    return (x.float() + update.float() + bias.float()).to(x.dtype)


def _square_sum(x):
    return x.float().pow(2).sum(-1)


def _rms_scaled(x, square_total, weight, width: int, eps: float):
    return (x.float() * torch.rsqrt(square_total.unsqueeze(-1) / width + eps) * weight.float()).to(x.dtype)


@accelerator_compiled
def _modulated_layer_norm(x, shift, scale, eps: float):
    return _modulated_norm(x, shift, scale, eps)


def modulated_layer_norm(x, shift, scale, eps: float):
    """LayerNorm (no affine, float32 statistics) then AdaLN: norm(x) * (1 + scale) + shift, in x's dtype.

    shift and scale are [B, 1, D] (one row per sample).
    """
    return _modulated_layer_norm(x, per_sample(shift), per_sample(scale), eps)


@accelerator_compiled
def _gated_residual(x, update, gate, bias):
    return _gated_sum(x, update, gate, bias)


def gated_residual(x, update, gate, bias=None):
    """x + (update + bias) * gate computed in float32, returned in x's dtype; gate is [B, 1, D], bias [D].

    The bias of the linear producing `update` is added here instead of in a pass of its own.
    """
    return _gated_residual(x, update, per_sample(gate), bias)


@accelerator_compiled
def _residual_bias(x, update, bias):
    return _sum(x, update, bias)


def residual(x, update, bias=None):
    """x + update (+ bias [D]) in one pass, float32 arithmetic, x's dtype."""
    if bias is None:
        return _sum(x, update, bias)
    return _residual_bias(x, update, bias)


@accelerator_compiled
def _affine_layer_norm(x, weight, bias, eps: float):
    return _affine_norm(x, weight, bias, eps)


def affine_layer_norm(x, weight, bias, eps: float):
    """LayerNorm with weight and bias [D], float32 statistics, returned in x's dtype."""
    return _affine_layer_norm(x, weight, bias, eps)


@accelerator_compiled
def _gated_residual_affine_norm(x, update, gate, bias, norm_weight, norm_bias, eps: float):
    hidden = _gated_sum(x, update, gate, bias)
    return hidden, _affine_norm(hidden, norm_weight, norm_bias, eps)


def gated_residual_affine_norm(x, update, gate, bias, norm_weight, norm_bias, eps: float):
    """(hidden, normed) = (gated_residual(x, update, gate, bias), affine_layer_norm(hidden, ...)) in one pass.

    normed is the LayerNorm of hidden as returned (rounded to x's dtype), so both equal the two pieces run
    one after the other.
    """
    return _gated_residual_affine_norm(x, update, per_sample(gate), bias, norm_weight, norm_bias, eps)


@accelerator_compiled
def _residual_modulated_norm(x, update, bias, shift, scale, eps: float):
    hidden = _sum(x, update, bias)
    return hidden, _modulated_norm(hidden, shift, scale, eps)


def residual_modulated_norm(x, update, bias, shift, scale, eps: float):
    """(hidden, normed) = (residual(x, update, bias), modulated_layer_norm(hidden, shift, scale)) in one pass."""
    return _residual_modulated_norm(x, update, bias, per_sample(shift), per_sample(scale), eps)


@accelerator_compiled
def square_sum(x):
    """Sum of squares over the last dimension, float32, without a trailing size-1 dimension."""
    return _square_sum(x)


@accelerator_compiled
def rms_scale(x, square_total, weight, width: int, eps: float):
    """x * rsqrt(mean square + eps) * weight given the (possibly all-reduced) sum of squares [..., N]."""
    return _rms_scaled(x, square_total, weight, width, eps)


@accelerator_compiled
def rms_norm(x, weight, eps: float):
    """rms_scale(x, square_sum(x), weight, x.shape[-1], eps) in one pass: RMSNorm over the last dimension."""
    return _rms_scaled(x, _square_sum(x), weight, x.shape[-1], eps)


@accelerator_compiled
def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")
