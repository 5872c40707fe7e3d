"""3D rotary position embedding (time, height, width) in the interleaved-pair convention of Wan2.1.

Tables are computed for every token's original grid position so they can travel with the tokens.
"""

import functools

import torch

from osp_megatron.utils.compile import accelerator_compiled


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (t, h, w): h and w get 2*(head_dim//6) each, t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, channels: int, theta: float) -> torch.Tensor:
    inverse = 1.0 / theta ** (torch.arange(0, channels, 2, dtype=torch.float64, device=positions.device) / channels)
    return torch.outer(positions.to(torch.float64), inverse).repeat_interleave(2, dim=1)


@functools.lru_cache(maxsize=8)
def rope_tables(grid, head_dim: int, theta: float = 10000.0, device=None):
    """cos and sin tables [1, T*H*W, 1, head_dim] (float32) for a (T, H, W) token grid, row-major.

    Built on `device` and cached per (grid, head_dim, theta, device): at 768P they are 80 MB, which a
    host-to-device copy every step would spend ~14 ms on.
    """
    grid, device = tuple(grid), torch.device(device) if device is not None else None
    frames, height, width = grid
    t_dim, h_dim, w_dim = rope_split(head_dim)
    angle_t = _axis_angles(torch.arange(frames, device=device), t_dim, theta)
    angle_h = _axis_angles(torch.arange(height, device=device), h_dim, theta)
    angle_w = _axis_angles(torch.arange(width, device=device), w_dim, theta)
    angles = torch.cat(
        [
            angle_t[:, None, None, :].expand(frames, height, width, t_dim),
            angle_h[None, :, None, :].expand(frames, height, width, h_dim),
            angle_w[None, None, :, :].expand(frames, height, width, w_dim),
        ],
        dim=-1,
    ).reshape(1, frames * height * width, 1, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (2i, 2i+1) of x [B, N, heads, head_dim] by the tabled angles."""
    return rotary(x, cos, sin)


@functools.lru_cache(maxsize=8)
def sincos_positions(grid, dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Fixed absolute position embeddings [1, T*H*W, dim] (float32) of a (T, H, W) token grid, row-major: each
    axis gets the channels rope_split gives it, half sines and half cosines of position times frequencies."""
    grid, device = tuple(grid), torch.device(device) if device is not None else None
    parts = []
    for axis, (size, channels) in enumerate(zip(grid, rope_split(dim))):
        angles = _axis_angles(torch.arange(size, device=device), channels, theta)[:, ::2]  # [size, channels/2]
        table = torch.cat([angles.sin(), angles.cos()], dim=1)
        shape = [1, 1, 1, channels]
        shape[axis] = size
        parts.append(table.view(shape).expand(*grid, channels))
    return torch.cat(parts, dim=-1).reshape(1, -1, dim).float()


@accelerator_compiled
def rotary(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x [B, N, heads, head_dim] by angles tabled as cos/sin [.., N, 1, head_dim]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos_half, sin_half = cos[..., 0::2], sin[..., 0::2]
    rotated = torch.stack((real * cos_half - imag * sin_half, real * sin_half + imag * cos_half), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
