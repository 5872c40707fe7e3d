"""Tests of the tiny block VAE (it reconstructs the synthetic caption videos and is normalised for them) and of
the config key that selects the built-in VAE."""

import itertools
import math

import numpy as np
import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.data import synthetic
from osp_megatron.engine.config import load_job_config
from osp_megatron.models import block_vae
from osp_megatron.models.vae import build_vae

CAPTIONS = [
    ("red", "circle", "moving up"),
    ("blue", "square", "moving left"),
    ("white", "wide bar", "moving right"),
    ("purple", "tall bar", "moving down"),
    ("green", "circle", "staying still"),
    ("yellow", "square", "moving down"),
]


def _pixels(videos):
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _uint8(video):
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def test_block_vae_reconstructs_caption_videos():
    """Encoding then decoding a rendered 9 x 128 x 128 caption video keeps it: PSNR of at least 24 dB, the shape's
    colour within 30 of the palette value, its centre within 3 % of the frame, and its motion."""
    vae = build_vae(None, tiny="tiny-block")
    videos = [synthetic.render_caption_video(*words, 9, 128, 128) for words in CAPTIONS]
    latents = vae.encode(_pixels(videos))
    assert latents.shape == (len(CAPTIONS), 16, 3, 16, 16) == (len(CAPTIONS), *vae.latent_shape(9, 128, 128))
    decoded = vae.decode(latents)
    assert decoded.shape == (len(CAPTIONS), 3, 9, 128, 128)
    error = (decoded - _pixels(videos)).pow(2).mean().item()
    assert 10 * math.log10(4 / error) >= 24
    for words, video, reconstruction in zip(CAPTIONS, videos, decoded):
        measured, truth = synthetic.measure_blob(_uint8(reconstruction)), synthetic.measure_blob(video)
        assert measured.colour == words[0] and measured.motion() == words[2]
        np.testing.assert_allclose(measured.rgb, synthetic.COLOUR_RGB[words[0]], atol=30)
        np.testing.assert_allclose(measured.centres, truth.centres, atol=0.03)


def test_block_codec_is_exact_on_what_it_represents():
    """A video that is constant over each 4 x 4-pixel quarter and ramps linearly over each cell's four frames
    decodes back to itself away from the quarter edges (bilinear interpolation blends neighbours there), and
    encoding the decoded constant video again gives the same latents."""
    flat = torch.linspace(-0.8, 0.8, 3).view(1, 3, 1, 1, 1).expand(1, 3, 9, 16, 16).clone()
    latents = block_vae.encode_raw(flat)
    np.testing.assert_allclose(block_vae.decode_raw(latents).numpy(), flat.numpy(), atol=1e-6)
    ramp = flat.clone()
    ramp[:, :, 1:5] += torch.tensor([-0.15, -0.05, 0.05, 0.15]).view(1, 1, 4, 1, 1)
    np.testing.assert_allclose(block_vae.decode_raw(block_vae.encode_raw(ramp)).numpy(), ramp.numpy(), atol=1e-6)
    np.testing.assert_allclose(block_vae.encode_raw(block_vae.decode_raw(latents)).numpy(), latents.numpy(), atol=1e-6)


def test_block_latents_are_normalised_and_sizes_checked():
    """The caption videos' latents are zero-mean and unit-scale, as the DiT's noise; sizes off the strides and
    latents with the wrong channel count are refused with the rule."""
    vae = build_vae(None, tiny="tiny-block")
    videos = [synthetic.render_caption_video(*words, 9, 128, 128) for words in CAPTIONS]
    latents = vae.encode(_pixels(videos))
    assert abs(latents.mean().item()) < 0.3 and 0.5 < latents.std().item() < 2.0
    with pytest.raises(ConfigError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ConfigError, match="multiple of the VAE spatial stride 8"):
        vae.latent_shape(9, 100, 128)
    with pytest.raises(ConfigError, match="expects latents \\[B, 16"):
        vae.decode(torch.zeros(1, 4, 3, 2, 2))


def measure_shape_scale() -> float:
    """One scale for all channels such that the cells a shape covers in the synthetic caption videos (every
    caption rendered 9 x 128 x 128) have an RMS of SHAPE_RMS around the background, as the blobs of the analytic
    synthetic latents do: a flow-matching DiT then sees signal and noise on the same scale."""
    videos = np.stack(
        [
            synthetic.render_caption_video(*words, 9, 128, 128)
            for words in itertools.product(synthetic.COLOURS, synthetic.SHAPES, synthetic.MOTIONS)
        ]
    )
    latents = block_vae.encode_raw(torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0)
    plain = torch.from_numpy(synthetic.background_image(128, 128)).float().permute(2, 0, 1) / 127.5 - 1.0
    deviation = latents - block_vae.encode_raw(plain[None, :, None].expand(1, 3, 9, 128, 128))
    covered = deviation.abs().amax(dim=1, keepdim=True).expand_as(deviation) > 0.1
    return deviation[covered].pow(2).mean().sqrt().item() / block_vae.SHAPE_RMS


def test_stored_normalisation_is_what_the_caption_videos_give():
    """The normalisation kept in the code is the one measured from the caption videos: the block VAE's background
    is the synthetic set's, cells of that centre colour encode to 0, and the stored shape scale equals a fresh
    measurement."""
    assert block_vae.SYNTHETIC_BACKGROUND_RGB == synthetic.BACKGROUND_RGB
    background = synthetic.render_caption_video("red", "circle", "staying still", 9, 128, 128)
    background[:] = synthetic.BACKGROUND_RGB
    assert build_vae(None, tiny="tiny-block").encode(_pixels([background])).abs().max().item() < 1e-6
    assert measure_shape_scale() == pytest.approx(block_vae.SYNTHETIC_SHAPE_SCALE, rel=1e-6)


def test_vae_choice_in_the_job_config():
    """model.vae selects the built-in VAE, data.synthetic_vae follows it, and bad combinations name their keys."""
    config = load_job_config(None, ["model.vae=tiny-block"])
    assert config.data.synthetic_vae == "tiny-block"
    assert load_job_config(None, []).data.synthetic_vae == "tiny-random"
    with pytest.raises(ConfigError, match="model.vae"):
        load_job_config(None, ["model.vae=tiny-trained"])
    with pytest.raises(ConfigError, match="model.vae.*vae_path"):
        load_job_config(None, ["model.vae=tiny-block", "model.vae_path=/weights/vae"])
    with pytest.raises(ConfigError, match="data.synthetic_vae=tiny-random does not match model.vae=tiny-block"):
        load_job_config(None, ["model.vae=tiny-block", "data.synthetic_vae=tiny-random"])
    with pytest.raises(ConfigError, match="model.vae: tiny-block has 16 latent channels"):
        load_job_config(None, ["model.vae=tiny-block", "model.in_channels=4", "model.out_channels=4"])
    with pytest.raises(ConfigError, match="model.vae: unknown VAE"):
        build_vae(None, tiny="tiny-trained")


def test_tiny_random_vae_is_unchanged_by_the_choice():
    """The default stays the seeded random VAE that unit tests use."""
    a, b = build_vae(None, seed=1), build_vae(None, seed=1, tiny="tiny-random")
    for (name, x), (_, y) in zip(a.autoencoder.state_dict().items(), b.autoencoder.state_dict().items()):
        assert torch.equal(x, y), name
    assert not a.autoencoder.config.is_residual
