"""Tests of VideoVAE's chunked encode: it gives diffusers' latents for every chunk size, frame count and memory
format, takes diffusers' path where only that one applies, and refuses a chunk size the strides do not allow."""

import copy
import functools

import pytest
import torch
from diffusers import AutoencoderKLWan

from osp_megatron.config.errors import ConfigError
from osp_megatron.models import vae as vae_module
from osp_megatron.models.vae import DEFAULT_CHUNK_FRAMES, VideoVAE, build_vae, tiny_wan_vae

FRAME_COUNTS = (1, 5, 17)
CHUNK_SIZES = (4, 8, 12, 16, DEFAULT_CHUNK_FRAMES)


def _small_wan_vae(dtype):
    """A random AutoencoderKLWan with two channel widths (so its residual blocks have shortcut convolutions)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).to(dtype)


def _video(frames, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, 32, 48, generator=generator, dtype=dtype) * 2 - 1


def _diffusers_latents(autoencoder, video, device="cpu"):
    return VideoVAE(autoencoder, device, chunk_frames=None).encode(video)


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_chunked_encode_is_diffusers_encode_exactly_in_float64(frames):
    """In float64 every chunk size gives exactly diffusers' latents (batch of 2), in the default and the
    channels-last memory format and with batch slicing on: the causal caches carry over the same frames."""
    autoencoder = _small_wan_vae(torch.float64)
    video = _video(frames, torch.float64)
    expected = _diffusers_latents(autoencoder, video)
    assert expected.shape == (2, 16, 1 + (frames - 1) // 4, 4, 6)
    for chunk_frames in CHUNK_SIZES:
        vae = VideoVAE(autoencoder, chunk_frames=chunk_frames)
        assert vae.uses_chunked_encode
        torch.testing.assert_close(vae.encode(video), expected, rtol=0, atol=0)
    channels_last = VideoVAE(copy.deepcopy(autoencoder), chunk_frames=8, channels_last=True)
    torch.testing.assert_close(channels_last.encode(video), expected, rtol=0, atol=0)
    sliced = copy.deepcopy(autoencoder)
    sliced.enable_slicing()
    torch.testing.assert_close(VideoVAE(sliced, chunk_frames=8).encode(video), expected, rtol=0, atol=0)


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_chunked_encode_matches_diffusers_in_float32(frames):
    """The tiny VAE in float32: every chunk size and channels-last agree with diffusers' encode to rounding."""
    autoencoder = tiny_wan_vae(seed=3)
    video = _video(frames, torch.float32, seed=1)
    expected = _diffusers_latents(autoencoder, video)
    for chunk_frames in CHUNK_SIZES:
        got = VideoVAE(autoencoder, chunk_frames=chunk_frames).encode(video)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got = VideoVAE(copy.deepcopy(autoencoder), chunk_frames=4, channels_last=True).encode(video)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous() and got.dtype == torch.float32


@pytest.mark.slow  # dynamo tracing takes about ten seconds on a CPU
def test_compiled_encoder_compiles_once_and_gives_diffusers_latents(monkeypatch):
    """With compile_encoder every full chunk after the first goes through one compiled graph (a recompilation
    is an error here), and the latents are diffusers' (dynamo traces the graph; it runs uncompiled here)."""
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=count_graphs))
    autoencoder = tiny_wan_vae().double()
    video = _video(9, torch.float64)
    expected = _diffusers_latents(autoencoder, video)
    vae = VideoVAE(autoencoder, chunk_frames=4, compile_encoder=True)
    try:
        torch.testing.assert_close(vae.encode(video), expected, rtol=0, atol=0)  # chunks 1 and 2 share the graph
        other = _video(9, torch.float64, seed=5)
        torch.testing.assert_close(vae.encode(other), _diffusers_latents(autoencoder, other), rtol=0, atol=0)
        assert graphs  # the chunks went through dynamo
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("chunk_frames", [6, 2, -4, 4.0, "8", True])
def test_bad_chunk_frames_is_a_config_error_naming_it(chunk_frames):
    """A chunk size that is not a positive multiple of the temporal stride is refused, naming the setting."""
    with pytest.raises(ConfigError, match="chunk_frames .*multiple of the VAE temporal stride 4"):
        VideoVAE(tiny_wan_vae(), chunk_frames=chunk_frames)
    with pytest.raises(ConfigError, match="chunk_frames"):
        build_vae(None, chunk_frames=chunk_frames)


def test_zero_or_none_chunk_frames_run_diffusers_encode(monkeypatch):
    """chunk_frames 0 or None call diffusers' own AutoencoderKLWan.encode; the default does not."""
    calls = []
    original = AutoencoderKLWan.encode
    monkeypatch.setattr(AutoencoderKLWan, "encode", lambda self, x: calls.append(x.shape) or original(self, x))
    video = _video(5, torch.float32)
    for chunk_frames in (None, 0):
        vae = VideoVAE(tiny_wan_vae(), chunk_frames=chunk_frames)
        assert not vae.uses_chunked_encode and vae.chunk_frames is None
        vae.encode(video)
    assert len(calls) == 2
    VideoVAE(tiny_wan_vae()).encode(video)
    assert len(calls) == 2


def test_configs_only_diffusers_handles_take_its_path():
    """Tiling on, or a Wan2.2-style config (patch_size, residual down blocks), falls back to diffusers' encode and
    still gives its latents."""
    tiled = tiny_wan_vae()
    tiled.enable_tiling()
    assert not VideoVAE(tiled).uses_chunked_encode
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wan22 = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
        )
    vae = VideoVAE(wan22)
    assert not vae.uses_chunked_encode and vae.spatial_stride == 16
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    raw = wan22.encode(video).latent_dist.mode()
    torch.testing.assert_close(vae.encode(video), (raw - vae.latents_mean) / vae.latents_std)


def test_cudnn_benchmark_is_on_only_during_a_cuda_encode():
    """cuDNN benchmark mode is switched on for a CUDA encode and restored after, even when the encode fails; a
    CPU encode leaves it alone."""
    before = torch.backends.cudnn.benchmark
    try:
        for previous in (False, True):
            torch.backends.cudnn.benchmark = previous
            with pytest.raises(RuntimeError):
                with vae_module._cudnn_autotuned(torch.device("cuda")):
                    assert torch.backends.cudnn.benchmark
                    raise RuntimeError("out of memory")
            assert torch.backends.cudnn.benchmark == previous
            with vae_module._cudnn_autotuned(torch.device("cpu")):
                assert torch.backends.cudnn.benchmark == previous
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_encode_on_cuda_in_bf16_matches_diffusers(channels_last):
    """On a GPU in bf16 the chunked encode agrees with diffusers' encode to bf16 rounding, and leaves cuDNN's
    benchmark flag as it found it."""
    autoencoder = _small_wan_vae(torch.bfloat16).cuda()
    video = _video(17, torch.float32)
    expected = _diffusers_latents(autoencoder, video, "cuda")
    before = torch.backends.cudnn.benchmark
    for chunk_frames in (4, 16):
        vae = VideoVAE(copy.deepcopy(autoencoder), "cuda", chunk_frames=chunk_frames, channels_last=channels_last)
        got = vae.encode(video)
        assert torch.backends.cudnn.benchmark == before
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2
