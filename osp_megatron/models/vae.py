"""Frozen Wan video VAE: pixels in [-1, 1] <-> latents normalised per channel, stride (4, 8, 8).

Wraps diffusers' AutoencoderKLWan, loaded from a local folder or built tiny with random weights for tests.
"""

import os

import torch
from diffusers import AutoencoderKLWan

from osp_megatron.config.errors import ConfigError
from osp_megatron.models.block_vae import tiny_block_vae
from osp_megatron.models.video_shapes import VideoShapes

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
_EXPECTED_LAYOUT = (
    "a diffusers AutoencoderKLWan folder with config.json and diffusion_pytorch_model.safetensors "
    "(or a diffusers model folder holding it in vae/)"
)


class VideoVAE(VideoShapes):
    """Encodes videos to normalised latents and back; the DiT only ever sees normalised latents."""

    def __init__(self, autoencoder, device="cpu"):
        self.autoencoder = autoencoder.eval().requires_grad_(False).to(device)
        config = autoencoder.config
        self.latent_channels = config.z_dim
        self.temporal_stride = getattr(config, "scale_factor_temporal", None) or 2 ** sum(config.temperal_downsample)
        self.spatial_stride = getattr(config, "scale_factor_spatial", None) or 2 ** len(config.temperal_downsample)
        shape = (1, config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)

    @property
    def device(self):
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self):
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, video):
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (F-1)/4, H/8, W/8] float32."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ConfigError(f"VAE encode expects video [B, 3, F, H, W], got shape {tuple(video.shape)}")
        self.check_video_size(*video.shape[2:], where="VAE encode")
        posterior = self.autoencoder.encode(video.to(self.device, self.dtype)).latent_dist
        # The posterior mean, not a sample, so that encoding the same clip always gives the same latents.
        latents = posterior.mode().float().cpu()
        return (latents - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents):
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 1 + 4 (T-1), 8 h, 8 w] float32 in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ConfigError(
                f"VAE decode expects latents [B, {self.latent_channels}, T, h, w], got shape {tuple(latents.shape)}"
            )
        raw = latents.float().cpu() * self.latents_std + self.latents_mean
        video = self.autoencoder.decode(raw.to(self.device, self.dtype)).sample
        return video.float().clamp(-1.0, 1.0).cpu()

    def to(self, device):
        self.autoencoder.to(device)
        return self


def tiny_wan_vae(seed=0):
    """A random-weight AutoencoderKLWan with Wan's stride and 16 latent channels, ~70k parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


VAE_CHOICES = ("tiny-random", "tiny-block")


def build_vae(path=None, seed=0, device="cpu", dtype=torch.float32, tiny="tiny-random"):
    """Load AutoencoderKLWan from the local folder `path`; when path is None build the tiny one named by `tiny`:
    "tiny-random" (random weights seeded by `seed`) or "tiny-block" (the closed-form block codec of
    models/block_vae.py, normalised for the synthetic videos)."""
    if path is None:
        if tiny == "tiny-random":
            return VideoVAE(tiny_wan_vae(seed), device)
        if tiny == "tiny-block":
            return tiny_block_vae()
        raise ConfigError(f"model.vae: unknown VAE {tiny!r}; choose one of {', '.join(VAE_CHOICES)}")
    if not os.path.isdir(path):
        raise ConfigError(f"VAE path {path!r} is not a directory; expected {_EXPECTED_LAYOUT}")
    for folder in (path, os.path.join(path, "vae")):
        has_config = os.path.isfile(os.path.join(folder, "config.json"))
        if has_config and any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHT_FILES):
            break
    else:
        raise ConfigError(f"VAE path {path!r} is missing files; expected {_EXPECTED_LAYOUT}")
    try:
        autoencoder = AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load AutoencoderKLWan from {folder!r} ({exc}); expected {_EXPECTED_LAYOUT}") from exc
    return VideoVAE(autoencoder, device)
