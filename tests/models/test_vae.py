"""Tests of the tiny fitted Wan VAE: it reconstructs the synthetic caption videos, is cached, and is refitted when
its cache is damaged; and of the config key that selects it.

The default fit is shared per session (tests/conftest.py); cache tests use a two-step fit in a private folder.
"""

import math

import numpy as np
import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.job import load_job_config
from osp_megatron.data import synthetic
from osp_megatron.models import fitted_vae as fitting
from osp_megatron.models.vae import build_vae
from osp_megatron.utils.cache import CACHE_ENV

CAPTIONS = [("red", "circle", "moving up"), ("blue", "square", "moving left"), ("white", "wide bar", "moving right"),
            ("purple", "tall bar", "moving down"), ("green", "circle", "staying still"),
            ("yellow", "square", "moving down")]
QUICK = fitting.FitSettings(steps=2, batch_size=2, frame_size=32, crop=16, num_frames=5)


def _pixels(videos):
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _uint8(video):
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def test_fitted_vae_reconstructs_caption_videos(fitted_vae):
    """Encoding then decoding a rendered 9 x 128 x 128 caption video keeps it: PSNR of at least 24 dB, the shape's
    colour within 30 of the palette value, and its centre within 4 % of the frame."""
    videos = [synthetic.render_caption_video(*words, 9, 128, 128) for words in CAPTIONS]
    latents = fitted_vae.encode(_pixels(videos))
    assert latents.shape == (len(CAPTIONS), 16, 3, 16, 16)
    decoded = fitted_vae.decode(latents)
    error = (decoded - _pixels(videos)).pow(2).mean().item()
    assert 10 * math.log10(4 / error) >= 24
    for words, video, reconstruction in zip(CAPTIONS, videos, decoded):
        measured, truth = synthetic.measure_blob(_uint8(reconstruction)), synthetic.measure_blob(video)
        assert measured.colour == words[0] and measured.motion() == words[2]
        np.testing.assert_allclose(measured.rgb, synthetic.COLOUR_RGB[words[0]], atol=30)
        np.testing.assert_allclose(measured.centres, truth.centres, atol=0.04)


def test_fitted_latents_are_normalised(fitted_vae):
    """The recorded latent statistics make the caption videos' latents zero-mean and unit-scale, as the DiT's noise."""
    videos = [synthetic.render_caption_video(*words, 9, 128, 128) for words in CAPTIONS]
    latents = fitted_vae.encode(_pixels(videos))
    assert abs(latents.mean().item()) < 0.3 and 0.5 < latents.std().item() < 2.0


def test_cached_vae_is_loaded_without_fitting(fitted_vae, monkeypatch):
    """A second build reads the cache: same weights, and fitting is never called."""
    monkeypatch.setattr(fitting, "fit_tiny_vae", lambda *a, **k: pytest.fail("fitted again"))
    again = build_vae(None, tiny="tiny-fitted")
    for (name, a), (_, b) in zip(fitted_vae.autoencoder.state_dict().items(), again.autoencoder.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def quick_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fit_is_deterministic_and_cached_atomically(quick_cache):
    """Two fits with one seed give identical weights; the cache folder holds config, weights and a record, and no
    temporary folder is left."""
    first, record = fitting.fit_tiny_vae(QUICK)
    second, _ = fitting.fit_tiny_vae(QUICK)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert record["settings"]["steps"] == 2 and math.isfinite(record["psnr_db"])
    fitting.load_tiny_fitted_vae(QUICK, log=lambda text: None)
    folder = fitting.cache_folder(QUICK)
    assert folder.parent.parent == quick_cache
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                         "fit.json"]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    assert fitting.FitSettings(steps=3).key() != fitting.FitSettings().key()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing record"])
def test_damaged_cache_is_refitted_with_a_warning(quick_cache, damage):
    """A truncated or altered weight file, or a missing record, is refitted with a warning naming the folder."""
    reference = fitting.load_tiny_fitted_vae(QUICK, log=lambda text: None)
    folder = fitting.cache_folder(QUICK)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        (folder / "fit.json").unlink()
    with pytest.warns(UserWarning, match=f"{folder}.*damaged"):
        refitted = fitting.load_tiny_fitted_vae(QUICK, log=lambda text: None)
    for (name, a), (_, b) in zip(reference.state_dict().items(), refitted.state_dict().items()):
        assert torch.equal(a, b), name
    assert weights.read_bytes() == data


def test_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    """A cache root that cannot be created is a ConfigError naming $OSP_MEGATRON_CACHE."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(ConfigError, match=CACHE_ENV):
        fitting.load_tiny_fitted_vae(QUICK, log=lambda text: None)


def test_vae_choice_in_the_job_config():
    """model.vae selects the built-in VAE, data.synthetic_vae follows it, and bad combinations name their keys."""
    config = load_job_config(None, ["model.vae=tiny-fitted"])
    assert config.data.synthetic_vae == "tiny-fitted"
    assert load_job_config(None, []).data.synthetic_vae == "tiny-random"
    with pytest.raises(ConfigError, match="model.vae"):
        load_job_config(None, ["model.vae=tiny-trained"])
    with pytest.raises(ConfigError, match="model.vae.*vae_path"):
        load_job_config(None, ["model.vae=tiny-fitted", "model.vae_path=/weights/vae"])
    with pytest.raises(ConfigError, match="data.synthetic_vae=tiny-random does not match model.vae=tiny-fitted"):
        load_job_config(None, ["model.vae=tiny-fitted", "data.synthetic_vae=tiny-random"])
    with pytest.raises(ConfigError, match="model.vae: unknown VAE"):
        build_vae(None, tiny="tiny-trained")


def test_tiny_random_vae_is_unchanged_by_the_choice():
    """The default stays the seeded random VAE that unit tests use."""
    a, b = build_vae(None, seed=1), build_vae(None, seed=1, tiny="tiny-random")
    for (name, x), (_, y) in zip(a.autoencoder.state_dict().items(), b.autoencoder.state_dict().items()):
        assert torch.equal(x, y), name
    assert not a.autoencoder.config.is_residual
