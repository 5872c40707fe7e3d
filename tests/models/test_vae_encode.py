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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_fused_elementwise_pieces_give_diffusers_latents(channels_last):
    """fuse_elementwise (norm + SiLU in one computation, padding inside the convolutions) gives diffusers' latents
    to float64 rounding for 1, 5 and 17 frames, and leaves the model exactly as it found it."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    autoencoder = _small_wan_vae(torch.float64)
    model = copy.deepcopy(autoencoder)
    before = {name: type(module) for name, module in model.named_modules()}
    keys = list(model.state_dict())
    vae = VideoVAE(model, chunk_frames=8, channels_last=channels_last, fuse_elementwise=True)
    for frames in FRAME_COUNTS:
        video = _video(frames, torch.float64, seed=frames)
        expected = _diffusers_latents(autoencoder, video)
        got = vae.encode(video)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not torch.equal(got, torch.zeros_like(got))
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert list(model.state_dict()) == keys
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, WanCausalConv3d))


def test_fused_pieces_replace_what_they_claim():
    """Inside the block: every residual block's two norms and the head's norm are fused with the SiLU (the SiLU
    itself becomes the identity), every causal convolution pads only in time."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResidualBlock

    from osp_megatron.models.vae_fusion import fused_encoder_pieces

    encoder = _small_wan_vae(torch.float32).encoder
    blocks = [m for m in encoder.modules() if isinstance(m, WanResidualBlock)]
    convs = [m for m in encoder.modules() if isinstance(m, WanCausalConv3d)]
    with fused_encoder_pieces(encoder):
        for block in blocks:
            assert type(block.norm1).__name__ == type(block.norm2).__name__ == "_NormSiLU"
            assert isinstance(block.nonlinearity, torch.nn.Identity)
        assert type(encoder.norm_out).__name__ == "_NormSiLU"
        assert all("forward" in vars(conv) for conv in convs)
    assert all(isinstance(block.nonlinearity, torch.nn.SiLU) for block in blocks)


@pytest.mark.slow  # compiles three graphs with the CPU backend (~10 s)
def test_fused_norm_compiles_three_graphs_for_every_stage_chunk_and_batch(monkeypatch):
    """Compiled (as on a GPU; here the CPU backend), the fused norm + SiLU serves every stage, the one-frame first
    chunk, later chunks, batch sizes 1 and 2 and both memory formats with three graphs (torch._dynamo's limit is
    8), and the latents stay those of the eager pieces."""
    from osp_megatron.models import vae_fusion
    from osp_megatron.quantization import kernels

    autoencoder = _small_wan_vae(torch.float32)
    videos = [_video(17, torch.float32)[:1], _video(9, torch.float32, seed=2)]
    eager = [VideoVAE(copy.deepcopy(autoencoder), chunk_frames=8, fuse_elementwise=True).encode(v) for v in videos]
    monkeypatch.setattr(kernels, "COMPILE_DEVICES", ("cpu",))
    for channels_last in (False, True):
        vae = VideoVAE(copy.deepcopy(autoencoder), chunk_frames=8, channels_last=channels_last, fuse_elementwise=True)
        for video, expected in zip(videos, eager):
            torch.testing.assert_close(vae.encode(video), expected, rtol=1e-5, atol=1e-5)
    (versions,) = [c.cell_contents for c in vae_fusion._rms_norm_silu.__closure__ if isinstance(c.cell_contents, dict)]
    graphs = [
        len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(f._torchdynamo_orig_callable.__code__))
        for f in versions.values()
    ]
    assert graphs == [3]


def test_rms_norm_silu_is_diffusers_norm_then_silu():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from osp_megatron.models.vae_fusion import rms_norm_silu

    norm = WanRMS_norm(12, images=False, bias=True).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 12, 3, 5, 7, dtype=torch.float64)
    x[0, :, 0, 0, 0] = 0  # a zero vector: F.normalize's eps, no division by zero
    expected = torch.nn.functional.silu(norm(x))
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        given = x.contiguous(memory_format=layout)
        got = rms_norm_silu(given, norm.gamma * norm.scale, norm.bias)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
        assert got.is_contiguous(memory_format=layout)
    half = x.to(torch.bfloat16)  # one rounding instead of several: within bf16 resolution of diffusers' result
    got = rms_norm_silu(half, (norm.gamma * norm.scale).to(torch.bfloat16), norm.bias.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.slow  # dynamo tracing takes about ten seconds on a CPU
def test_compiled_encoder_compiles_once_and_gives_diffusers_latents(monkeypatch):
    """With compile_encoder every full chunk after the first goes through one compiled graph (a recompilation
    is an error here), and the latents are diffusers' (dynamo traces the graph; it runs uncompiled here)."""
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=count_graphs))
    autoencoder = tiny_wan_vae().double()
    video = _video(9, torch.float64)
    expected = _diffusers_latents(autoencoder, video)
    vae = VideoVAE(autoencoder, chunk_frames=4, compile_encoder=True)
    # config.patch, not monkeypatch: undoing a monkeypatch of the config module left torch.compile failing on
    # "error_on_recompile does not exist" for the rest of the process
    with torch._dynamo.config.patch(error_on_recompile=True):
        try:
            torch.testing.assert_close(vae.encode(video), expected, rtol=0, atol=0)  # chunks 1 and 2 share a graph
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
@pytest.mark.parametrize("fuse", [False, True], ids=["eager-pieces", "fused-pieces"])
def test_chunked_encode_on_cuda_in_bf16_matches_diffusers(channels_last, fuse):
    """On a GPU in bf16 the chunked encode (with the compiled norm + SiLU where fused) agrees with diffusers'
    encode to bf16 rounding, and leaves cuDNN's benchmark flag as it found it."""
    autoencoder = _small_wan_vae(torch.bfloat16).cuda()
    video = _video(17, torch.float32)
    expected = _diffusers_latents(autoencoder, video, "cuda")
    before = torch.backends.cudnn.benchmark
    for chunk_frames in (4, 16):
        vae = VideoVAE(
            copy.deepcopy(autoencoder),
            "cuda",
            chunk_frames=chunk_frames,
            channels_last=channels_last,
            fuse_elementwise=fuse,
        )
        got = vae.encode(video)
        assert torch.backends.cudnn.benchmark == before
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2
