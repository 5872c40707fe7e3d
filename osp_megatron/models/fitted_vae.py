"""The tiny fitted Wan VAE: a small diffusers AutoencoderKLWan fitted on first use to the synthetic caption videos.

Fitted once per machine in tens of CPU seconds and cached, so the tiny default's samples decode to real pictures.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

from osp_megatron.config.errors import ConfigError
from osp_megatron.utils.cache import CACHE_ENV, cache_root

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_RECORD = "fit.json"
# Bump when the renderer, the initialisation or the fitting loop changes, so that caches are refitted.
_RECIPE_VERSION = 1
# The encoder's extra input channel: a constant that keeps brightness through the channel-wise RMS norms.
_CONSTANT_INPUT = 4.0
_RANDOM_PART = 0.1
# Latent channels of the fitted VAE (Wan2.1's).
LATENT_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """How the tiny VAE is fitted; every field is part of the cache key."""

    seed: int = 0
    steps: int = 80
    batch_size: int = 8
    lr: float = 3e-4
    base_dim: int = 8
    # Videos are rendered at frame_size and fitted on crop x crop windows of them (aligned to the 8-pixel latent
    # grid): the shapes keep the size they have in the 128 x 128 samples at a sixteenth of the pixels.
    frame_size: int = 128
    crop: int = 32
    num_frames: int = 9

    def key(self) -> str:
        text = json.dumps(dict(dataclasses.asdict(self), recipe=_RECIPE_VERSION), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_folder(settings: FitSettings = FitSettings()) -> Path:
    return cache_root() / "vae" / f"tiny-fitted-{settings.key()}"


def _centre_tap(conv, gains: dict, biases: dict | None = None) -> None:
    """Set a (causal) convolution to a per-pixel linear map, out[o] = sum gains[o, i] * in[i] + biases[o], plus a
    tenth of its random initialisation, so that the channels the map leaves out still receive gradients."""
    conv.weight.mul_(_RANDOM_PART)
    conv.bias.zero_()
    # A causal 3D convolution sees the current frame at its last temporal tap; spatial taps are centred.
    sizes = conv.weight.shape[2:]
    tap = (sizes[0] - 1, *(k // 2 for k in sizes[1:])) if len(sizes) == 3 else tuple(k // 2 for k in sizes)
    for (out_channel, in_channel), gain in gains.items():
        conv.weight[(out_channel, in_channel, *tap)] = gain
    for out_channel, bias in (biases or {}).items():
        conv.bias[out_channel] = bias


@torch.no_grad()
def shortcut_initialise(autoencoder: AutoencoderKLWan) -> None:
    """Start from a VAE that already reconstructs a blurred video: every residual branch zero (so the Wan2.2-style
    average-pool and duplicate shortcuts carry the signal), and the stems passing the colour straight through.

    The latent then holds each 8 x 8 x 4 block's mean colour; fitting only has to add the detail.
    """
    for module in autoencoder.modules():
        if isinstance(module, WanResidualBlock):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif isinstance(module, WanAttentionBlock):
            module.proj.weight.zero_()
            module.proj.bias.zero_()
        elif isinstance(module, WanResample) and module.mode != "none":
            for conv in (module.resample[1], getattr(module, "time_conv", None)):
                if conv is not None:
                    conv.weight.zero_()
                    conv.bias.zero_()
    rgb = range(3)
    # Colour in [0, 1] plus a constant channel: the RMS norms keep only directions, and the direction of
    # (r, g, b, constant) still says how bright the pixel is.
    _centre_tap(autoencoder.encoder.conv_in, {(c, c): 0.5 for c in rgb}, {0: 0.5, 1: 0.5, 2: 0.5, 3: _CONSTANT_INPUT})
    _centre_tap(autoencoder.encoder.conv_out, {(c, c): 1.0 for c in range(4)})
    _centre_tap(autoencoder.quant_conv, {(c, c): 1.0 for c in range(autoencoder.config.z_dim * 2)})
    _centre_tap(autoencoder.post_quant_conv, {(c, c): 1.0 for c in range(autoencoder.config.z_dim)})
    _centre_tap(autoencoder.decoder.conv_in, {(c, c): 1.0 for c in range(4)})
    # Roughly inverts the encoder's normalise-and-SiLU for a dark background and saturated colours.
    _centre_tap(autoencoder.decoder.conv_out, {(c, c): 4.0 for c in rgb}, {c: -1.0 for c in rgb})


def build_tiny_autoencoder(base_dim: int = 8, seed: int = 0) -> AutoencoderKLWan:
    """The fitted VAE's architecture: Wan's strides and 16 latent channels, Wan2.2's residual shortcut blocks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoencoderKLWan(base_dim=base_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       is_residual=True)
    shortcut_initialise(autoencoder)
    return autoencoder


def _caption_videos(settings: FitSettings) -> np.ndarray:
    """Every caption's rendered video, uint8 [N, T, H, W, 3]."""
    from osp_megatron.data.synthetic import COLOURS, MOTIONS, SHAPES, render_caption_video

    size = settings.frame_size
    return np.stack([render_caption_video(*words, settings.num_frames, size, size)
                     for words in itertools.product(COLOURS, SHAPES, MOTIONS)])


def _to_model_input(videos: np.ndarray) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _crops(videos: np.ndarray, settings: FitSettings, rng: np.random.Generator) -> torch.Tensor:
    """A batch of grid-aligned crops, each around its video's shape in a random frame so few are plain background."""
    from osp_megatron.data.synthetic import MOTIONS, blob_centres

    size, crop = settings.frame_size, settings.crop
    batch = []
    for _ in range(settings.batch_size):
        index = int(rng.integers(len(videos)))
        motion = MOTIONS[index % len(MOTIONS)]
        centre = blob_centres(motion, settings.num_frames)[rng.integers(settings.num_frames)] * size
        corner = centre - crop / 2 + rng.integers(-crop // 2, crop // 2 + 1, size=2)
        x0, y0 = (int(np.clip(c, 0, size - crop)) // 8 * 8 for c in corner)
        batch.append(videos[index, :, y0:y0 + crop, x0:x0 + crop])
    return _to_model_input(np.stack(batch))


def _reconstruct(autoencoder: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    return autoencoder.decode(autoencoder.encode(video).latent_dist.mode()).sample


def fit_tiny_vae(settings: FitSettings = FitSettings()) -> tuple[AutoencoderKLWan, dict]:
    """Fit the tiny VAE on rendered caption videos; returns it (latent statistics in its config) and its record.

    The loss is the pixel MSE of decoding the posterior mean, which is what encoding for training uses.
    """
    started = time.perf_counter()
    videos = _caption_videos(settings)
    autoencoder = build_tiny_autoencoder(settings.base_dim, settings.seed).train().requires_grad_(True)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.lr)
    rng = np.random.default_rng(settings.seed)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        batch = _crops(videos, settings, rng)
        loss = (_reconstruct(autoencoder, batch) - batch).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    autoencoder.eval().requires_grad_(False)
    # Latent statistics and reconstruction quality on every fifth caption's whole video.
    with torch.no_grad():
        check = _to_model_input(videos[::5])
        latents = autoencoder.encode(check).latent_dist.mode()
        error = (autoencoder.decode(latents).sample - check).pow(2).mean().item()
    # One scale for all channels: channels the fit leaves nearly constant stay near zero instead of being
    # blown up to unit variance.
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = (latents - mean.view(1, -1, 1, 1, 1)).std().clamp_min(1e-3).item()
    autoencoder.register_to_config(latents_mean=[round(v, 6) for v in mean.tolist()],
                                   latents_std=[round(std, 6)] * len(mean))
    record = dict(settings=dataclasses.asdict(settings), recipe=_RECIPE_VERSION,
                  psnr_db=round(10 * math.log10(4.0 / max(error, 1e-12)), 2),
                  fit_seconds=round(time.perf_counter() - started, 1))
    return autoencoder, record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_verified(folder: Path, settings: FitSettings) -> AutoencoderKLWan:
    """Load a cached fit, checking its record's settings and the weight file's checksum first."""
    record = json.loads((folder / _RECORD).read_text())
    if record.get("settings") != dataclasses.asdict(settings) or record.get("recipe") != _RECIPE_VERSION:
        raise ValueError(f"{_RECORD} records other settings {record.get('settings')}")
    if _sha256(folder / _WEIGHTS) != record.get("sha256"):
        raise ValueError(f"{_WEIGHTS} does not match the checksum in {_RECORD}")
    # low_cpu_mem_usage=False: the default asks for the optional `accelerate` package, with a warning.
    return AutoencoderKLWan.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)


def _save_atomically(autoencoder: AutoencoderKLWan, record: dict, folder: Path) -> None:
    """Write into a temporary sibling folder, then rename it into place, so a cache folder is always whole."""
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    autoencoder.save_pretrained(staging, safe_serialization=True)
    record = dict(record, sha256=_sha256(staging / _WEIGHTS))
    (staging / _RECORD).write_text(json.dumps(record, indent=1))
    os.replace(staging, folder)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an advisory lock, so concurrent processes fit once and the others load the result."""
    import fcntl

    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_tiny_fitted_vae(settings: FitSettings = FitSettings(), log=print) -> AutoencoderKLWan:
    """The cached tiny fitted VAE; fitted (and cached) first when the cache lacks it or holds a damaged copy."""
    folder = cache_folder(settings)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the cache folder {folder.parent} ({exc}); point ${CACHE_ENV} at a "
                          "writable folder") from exc
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if folder.exists():
            try:
                return _load_verified(folder, settings)
            except Exception as exc:  # any unreadable cache is refitted; the cache holds only our own files
                warnings.warn(f"the cached tiny VAE in {folder} is damaged ({exc}); fitting it again")
                shutil.rmtree(folder)
        log(f"fitting the tiny VAE on synthetic videos (first use; {settings.steps} steps, cached in {folder})")
        autoencoder, record = fit_tiny_vae(settings)
        _save_atomically(autoencoder, record, folder)
        log(f"tiny VAE fitted in {record['fit_seconds']} s, reconstruction PSNR {record['psnr_db']} dB")
        return autoencoder
