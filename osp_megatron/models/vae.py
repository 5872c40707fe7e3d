"""Frozen Wan video VAE: pixels in [-1, 1] <-> latents normalised per channel, stride (4, 8, 8).

Wraps diffusers' AutoencoderKLWan, loaded from a local folder or built tiny with random weights for tests; encodes
in long frame chunks (docs/data.md, "Encoding speed").
"""

import contextlib
import os

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from osp_megatron.config.errors import ConfigError
from osp_megatron.models.block_vae import tiny_block_vae
from osp_megatron.models.vae_fusion import fused_encoder_pieces
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


# Frames per encoder call after the first frame. 20 cuts the 80 frames after the first of an 81-frame clip (and
# the 120 of a 121-frame one) into equal chunks, so one set of convolution shapes serves a whole clip, and keeps a
# batch of two 480P clips in bf16 well inside one 80 GB GPU beside umT5-XXL (docs/data.md, "Encoding speed").
DEFAULT_CHUNK_FRAMES = 20


def check_chunk_frames(chunk_frames: int | None, temporal_stride: int = 4, setting: str = "chunk_frames") -> int | None:
    """The encoder's frames per call, or None for diffusers' own encode (given as None or 0); ConfigError naming
    `setting` unless it is a positive multiple of the temporal stride (the chunks must line up with the strided
    time downsampling)."""
    if chunk_frames is None or chunk_frames == 0:
        return None
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 0:
        raise ConfigError(
            f"{setting} must be 0 (diffusers' own encode) or a positive multiple of the VAE temporal stride "
            f"{temporal_stride}, e.g. {DEFAULT_CHUNK_FRAMES}; got {chunk_frames!r}"
        )
    if chunk_frames % temporal_stride:
        raise ConfigError(
            f"{setting} must be a multiple of the VAE temporal stride {temporal_stride} (e.g. "
            f"{DEFAULT_CHUNK_FRAMES}) so that the chunks line up with the time downsampling, or 0 for diffusers' own "
            f"encode; got {chunk_frames}"
        )
    return chunk_frames


class VideoVAE(VideoShapes):
    """Encodes videos to normalised latents and back; the DiT only ever sees normalised latents.

    chunk_frames: frames per encoder call after the first frame (a multiple of the temporal stride); None or 0
    runs diffusers' own `AutoencoderKLWan.encode` (4 frames a call). Every chunk size gives diffusers' latents:
    the causal convolutions carry their last frames over from chunk to chunk either way.
    channels_last: run the encoder in the channels-last-3d memory format (its weights are converted in place on
    the first encode). compile_encoder: torch.compile the encoder (one compilation per input shape, for up to
    torch._dynamo's recompile limit, 8 by default; later ones run uncompiled). fuse_elementwise: RMS norm + SiLU as
    one computation (compiled on CUDA) and no separate spatial padding copy before each causal convolution
    (models/vae_fusion.py); the same arithmetic, so latents agree with diffusers' to rounding.
    Configs with patch_size (Wan2.2), residual down blocks or tiling on always take diffusers' path.
    """

    def __init__(
        self,
        autoencoder,
        device="cpu",
        chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
        channels_last: bool = False,
        compile_encoder: bool = False,
        fuse_elementwise: bool = False,
    ):
        self.autoencoder = autoencoder.eval().requires_grad_(False).to(device)
        config = autoencoder.config
        self.latent_channels = config.z_dim
        self.temporal_stride = getattr(config, "scale_factor_temporal", None) or 2 ** sum(config.temperal_downsample)
        self.spatial_stride = getattr(config, "scale_factor_spatial", None) or 2 ** len(config.temperal_downsample)
        shape = (1, config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)
        self.chunk_frames = check_chunk_frames(chunk_frames, self.temporal_stride)
        self.channels_last = channels_last
        self.compile_encoder = compile_encoder
        self.fuse_elementwise = fuse_elementwise
        self._compiled_encoder = None
        self._weights_channels_last = False
        # One feature-cache slot per causal convolution, as diffusers allots them.
        self._cache_slots = sum(isinstance(module, WanCausalConv3d) for module in autoencoder.encoder.modules())

    @property
    def device(self):
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self):
        return next(self.autoencoder.parameters()).dtype

    @property
    def uses_chunked_encode(self) -> bool:
        """Whether encode runs the chunked loop; False: diffusers' own encode (asked for, or a config it alone
        handles)."""
        config = self.autoencoder.config
        return (
            self.chunk_frames is not None
            and getattr(config, "patch_size", None) is None
            and not getattr(config, "is_residual", False)
            and not self.autoencoder.use_tiling
        )

    @torch.no_grad()
    def encode(self, video):
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (F-1)/4, H/8, W/8] float32."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ConfigError(f"VAE encode expects video [B, 3, F, H, W], got shape {tuple(video.shape)}")
        self.check_video_size(*video.shape[2:], where="VAE encode")
        video = video.to(self.device, self.dtype)
        if self.uses_chunked_encode:
            with _cudnn_autotuned(video.device):
                samples = video.split(1) if self.autoencoder.use_slicing else [video]
                moments = torch.cat([self._encode_moments(sample) for sample in samples])
            # The posterior mean (the first half of the moments), as diffusers' mode() below.
            latents = moments[:, : self.latent_channels]
        else:
            posterior = self.autoencoder.encode(video).latent_dist
            # The posterior mean, not a sample, so that encoding the same clip always gives the same latents.
            latents = posterior.mode()
        latents = latents.float().contiguous().cpu()
        return (latents - self.latents_mean) / self.latents_std

    def _encode_moments(self, video):
        """diffusers' AutoencoderKLWan._encode with chunks of chunk_frames frames after the first frame."""
        encoder = self._prepared_encoder()
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        video = video.contiguous(memory_format=layout)
        frames = video.shape[2]
        starts = [0, *range(1, frames, self.chunk_frames)]
        feature_cache, outputs = [None] * self._cache_slots, []
        fusion = fused_encoder_pieces(self.autoencoder.encoder) if self.fuse_elementwise else contextlib.nullcontext()
        with fusion:
            for start, end in zip(starts, [*starts[1:], frames]):
                # The first frame and a shorter last chunk run eagerly: the compiled encoder sees one input shape.
                run = encoder if start > 0 and end - start == self.chunk_frames else self.autoencoder.encoder
                outputs.append(run(video[:, :, start:end], feat_cache=feature_cache, feat_idx=[0]))
                _pad_cached_frames(feature_cache, layout)
        return self.autoencoder.quant_conv(torch.cat(outputs, dim=2))

    def _prepared_encoder(self):
        """The encoder module to run full chunks with: in channels-last weights and compiled when asked for."""
        if self.channels_last and not self._weights_channels_last:
            _to_channels_last(self.autoencoder.encoder)
            _to_channels_last(self.autoencoder.quant_conv)
            self._weights_channels_last = True
        if not self.compile_encoder:
            return self.autoencoder.encoder
        if self._compiled_encoder is None:
            self._compiled_encoder = torch.compile(self.autoencoder.encoder, dynamic=False)
        return self._compiled_encoder

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


def _pad_cached_frames(feature_cache, memory_format):
    """Give every cached feature two frames (zeros in front of a single one) and one memory format.

    After the first (one-frame) chunk the causal convolutions cache one frame and zero-pad the missing one
    themselves; padding the cache instead is the same arithmetic, and with one layout every later chunk gets
    inputs of the same shapes and strides, so a compiled encoder needs one graph. (The strided time
    downsampling reads only the last cached frame.)
    """
    for slot, cached in enumerate(feature_cache):
        if isinstance(cached, torch.Tensor):
            if cached.shape[2] == 1:
                cached = torch.cat([torch.zeros_like(cached), cached], dim=2)
            feature_cache[slot] = cached.contiguous(memory_format=memory_format)


def _to_channels_last(module):
    """Convolution weights into the channels-last formats (5-d: channels_last_3d, 4-d: channels_last), in place."""
    for param in module.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        elif param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _cudnn_autotuned(device):
    """cuDNN benchmark mode on CUDA (the fastest convolution algorithm per shape, tried once), restored after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def tiny_wan_vae(seed=0):
    """A random-weight AutoencoderKLWan with Wan's stride and 16 latent channels, ~70k parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


VAE_CHOICES = ("tiny-random", "tiny-block")


def build_vae(
    path=None,
    seed=0,
    device="cpu",
    dtype=torch.float32,
    tiny="tiny-random",
    *,
    chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
    channels_last: bool = False,
    compile_encoder: bool = False,
    fuse_elementwise: bool = False,
):
    """Load AutoencoderKLWan from the local folder `path`; when path is None build the tiny one named by `tiny`:
    "tiny-random" (random weights seeded by `seed`) or "tiny-block" (the closed-form block codec of
    models/block_vae.py, normalised for the synthetic videos). The keyword options set how VideoVAE encodes
    (the block codec has none)."""
    options = dict(
        chunk_frames=chunk_frames,
        channels_last=channels_last,
        compile_encoder=compile_encoder,
        fuse_elementwise=fuse_elementwise,
    )
    if path is None:
        if tiny == "tiny-random":
            return VideoVAE(tiny_wan_vae(seed), device, **options)
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
    return VideoVAE(autoencoder, device, **options)
