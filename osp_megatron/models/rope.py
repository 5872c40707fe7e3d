"""3D rotary position embedding (time, height, width) in the interleaved-pair convention of Wan2.1.

Tables are computed for every token's original grid position so they can travel with the tokens.
"""

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (t, h, w): h and w get 2*(head_dim//6) each, t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, channels: int, theta: float) -> torch.Tensor:
    inverse = 1.0 / theta ** (torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    return torch.outer(positions.to(torch.float64), inverse).repeat_interleave(2, dim=1)


def rope_tables(grid, head_dim: int, theta: float = 10000.0, device=None):
    """cos and sin tables [1, T*H*W, 1, head_dim] (float32) for a (T, H, W) token grid, row-major."""
    frames, height, width = grid
    t_dim, h_dim, w_dim = rope_split(head_dim)
    angle_t = _axis_angles(torch.arange(frames), t_dim, theta)
    angle_h = _axis_angles(torch.arange(height), h_dim, theta)
    angle_w = _axis_angles(torch.arange(width), w_dim, theta)
    angles = torch.cat(
        [
            angle_t[:, None, None, :].expand(frames, height, width, t_dim),
            angle_h[None, :, None, :].expand(frames, height, width, h_dim),
            angle_w[None, None, :, :].expand(frames, height, width, w_dim),
        ],
        dim=-1,
    ).reshape(1, frames * height * width, 1, head_dim)
    cos, sin = angles.cos().float(), angles.sin().float()
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (2i, 2i+1) of x [B, N, heads, head_dim] by the tabled angles."""
    from osp_megatron.models.wan.fused import rotary

    return rotary(x, cos, sin)
