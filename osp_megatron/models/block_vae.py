"""The tiny block VAE: a closed-form linear video codec with the Wan VAE's strides and 16 latent channels.

Built in milliseconds with nothing to download or fit, so the tiny default's samples decode to real pictures.
"""

import functools

import torch
import torch.nn.functional as F

from osp_megatron.config.errors import ConfigError
from osp_megatron.models.video_shapes import VideoShapes

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
# Channels 0-11: the RGB mean of each 4 x 4-pixel quarter of a latent cell (quarters row-major); 12-14: the
# cell's RGB change from the first to the second half of its frames; 15 is unused and always 0.
_QUARTERS = 12
_CHANGE = slice(12, 15)
# Frame weights of the change channels over a cell's four frames: a linear ramp with mean 0 whose
# (late half - early half) difference is 1, so decode(encode(ramp)) keeps a steady motion's ramp.
_RAMP = torch.tensor([-0.75, -0.25, 0.25, 0.75])
# RMS of the normalised latents where a shape is (the background is 0).
SHAPE_RMS = 1.5


def _frame_groups(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1 + 4k, H, W] -> [B, 3, 1 + k, 4, H, W]: the first frame alone (repeated, as Wan's causal VAE
    encodes it), then groups of four."""
    first = video[:, :, :1].unsqueeze(3).expand(-1, -1, -1, TEMPORAL_STRIDE, -1, -1)
    rest = video[:, :, 1:].unflatten(2, (-1, TEMPORAL_STRIDE))
    return torch.cat([first, rest], dim=2)


class BlockVideoVAE(VideoShapes):
    """Pixels in [-1, 1] <-> normalised latents [B, 16, 1 + (F-1)/4, H/8, W/8], like VideoVAE around a Wan VAE.

    A latent cell holds the mean colour of each quarter of its 8 x 8 pixels over its frames and how the cell's
    colour changes across them; decoding interpolates the quarter colours bilinearly over the frame and adds the
    change as a ramp over the cell's four frames. Sharp edges blur over about four pixels and motion inside a
    cell's four frames is linear; colours, positions and motion of shapes a few cells wide come back.
    """

    latent_channels = LATENT_CHANNELS
    temporal_stride = TEMPORAL_STRIDE
    spatial_stride = SPATIAL_STRIDE

    def __init__(self, latents_mean: torch.Tensor, latents_std: float):
        self.latents_mean = latents_mean.view(1, -1, 1, 1, 1).float()
        self.latents_std = float(latents_std)

    device = torch.device("cpu")
    dtype = torch.float32

    def to(self, device):
        return self  # encoding and decoding are a few pooling passes: they run on the CPU

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (F-1)/4, H/8, W/8] float32."""
        return (encode_raw(video) - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 1 + 4 (T-1), 8 h, 8 w] float32 in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ConfigError(
                f"VAE decode expects latents [B, {LATENT_CHANNELS}, T, h, w], got shape {tuple(latents.shape)}"
            )
        return decode_raw(latents.float().cpu() * self.latents_std + self.latents_mean)


def encode_raw(video: torch.Tensor) -> torch.Tensor:
    """Unnormalised block latents of a video [B, 3, 1 + 4k, H, W] (H, W multiples of 8)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ConfigError(f"VAE encode expects video [B, 3, F, H, W], got shape {tuple(video.shape)}")
    frames, height, width = video.shape[2:]
    if (frames - 1) % TEMPORAL_STRIDE or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ConfigError(
            f"VAE encode: a {frames} x {height} x {width} video does not fit the strides "
            f"({TEMPORAL_STRIDE}, {SPATIAL_STRIDE}, {SPATIAL_STRIDE}); use 1 + 4k frames and "
            "multiples of 8 pixels"
        )
    groups = _frame_groups(video.float().cpu())  # [B, 3, T, 4, H, W]
    batch, _, cells_t = groups.shape[:3]
    half = SPATIAL_STRIDE // 2
    # Quarter means: average pooling over the four frames and 4 x 4 pixels -> [B, 3, T, 2h, 2w].
    quarters = F.avg_pool2d(groups.mean(dim=3).flatten(0, 2), half).unflatten(0, (batch, 3, cells_t))
    rows, cols = quarters.shape[-2] // 2, quarters.shape[-1] // 2
    # [B, 3, T, h, 2, w, 2] -> [B, 3 * 4 (colour-major per quarter), T, h, w] with quarters row-major.
    quarters = quarters.unflatten(-2, (rows, 2)).unflatten(-1, (cols, 2))
    quarters = quarters.permute(0, 4, 6, 1, 2, 3, 5).reshape(batch, 4 * 3, cells_t, rows, cols)
    # Change across the cell's frames: late half minus early half, over the whole cell.
    cell = F.avg_pool2d(groups.flatten(0, 3), SPATIAL_STRIDE).unflatten(0, (batch, 3, cells_t, TEMPORAL_STRIDE))
    change = cell[:, :, :, 2:].mean(dim=3) - cell[:, :, :, :2].mean(dim=3)
    unused = torch.zeros(batch, 1, cells_t, rows, cols)
    return torch.cat([quarters, change, unused], dim=1)


def _upsample(planes: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bilinear resize of the last two dimensions of [B, C, T, y, x] to `size`."""
    flat = planes.reshape(-1, 1, *planes.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).view(*planes.shape[:3], *size)


def decode_raw(latents: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, 1 + 4 (T-1), 8 h, 8 w] in [-1, 1] of unnormalised block latents [B, 16, T, h, w]."""
    batch, _, cells_t, rows, cols = latents.shape
    quarters = latents[:, :_QUARTERS].reshape(batch, 2, 2, 3, cells_t, rows, cols)
    # Back to a [B, 3, T, 2h, 2w] grid of quarter colours, then bilinear up to pixels (each quarter is 4 x 4).
    grid = quarters.permute(0, 3, 4, 5, 1, 6, 2).reshape(batch, 3, cells_t, 2 * rows, 2 * cols)
    size = (rows * SPATIAL_STRIDE, cols * SPATIAL_STRIDE)
    pixels, change = (_upsample(planes, size) for planes in (grid, latents[:, _CHANGE]))  # [B, 3, T, H, W]
    frames = pixels.unsqueeze(3) + change.unsqueeze(3) * _RAMP.view(1, 1, 1, -1, 1, 1)  # [B, 3, T, 4, H, W]
    # The first cell is the first frame alone; every later cell gives four frames.
    video = torch.cat([frames[:, :, :1, -1], frames[:, :, 1:].flatten(2, 3)], dim=2)
    return video.clamp(-1.0, 1.0)


# The scale that makes the shapes of the synthetic caption videos have an RMS of SHAPE_RMS around the background,
# measured once (rendering all 120 caption videos: about a second per process); tests/models/test_vae.py measures it
# again.
SYNTHETIC_SHAPE_SCALE = 0.42566728591918945


# The synthetic set's background colour at the frame's centre (osp_megatron.data.synthetic.BACKGROUND_RGB, which a
# test keeps equal): the normalisation's mean.
SYNTHETIC_BACKGROUND_RGB = (30, 20, 30)


def background_latent() -> torch.Tensor:
    """The raw latent [16] of a cell of background at the frame's centre (the normalisation's mean): its colour
    in every quarter, no change, 0 unused. The shading away from the centre stays in the latents as signal."""
    colour = torch.tensor(SYNTHETIC_BACKGROUND_RGB, dtype=torch.float32) / 127.5 - 1.0
    return torch.cat([colour.repeat(_QUARTERS // 3), torch.zeros(LATENT_CHANNELS - _QUARTERS)])


@functools.lru_cache(maxsize=1)
def tiny_block_vae() -> BlockVideoVAE:
    """The block VAE normalised for the synthetic caption videos: the background at 0 and the shapes at an RMS
    of SHAPE_RMS. Deterministic: the same numbers on every machine."""
    return BlockVideoVAE(background_latent(), SYNTHETIC_SHAPE_SCALE)
