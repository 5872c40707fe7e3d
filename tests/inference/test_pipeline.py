"""End-to-end tests of the text-to-video pipeline with a closed-form velocity model, and SampleConfig.

The tiny VAE and text encoder keep a full generation under a second on CPU.
"""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.sample_config import SampleConfig
from osp_megatron.inference import TextToVideoPipeline, read_video
from osp_megatron.models.text_encoder import build_text_encoder
from osp_megatron.models.vae import build_vae


class TextDrivenVelocity(torch.nn.Module):
    """v = x - tanh(mean of the text states): the flow ends at a prompt-dependent constant latent."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, latents, timestep, text_states):
        self.calls.append((latents.shape, timestep.shape, text_states.shape))
        target = torch.tanh(text_states.mean(dim=(1, 2)))[:, None, None, None, None]
        return self.scale * (latents - target)


@pytest.fixture(scope="module")
def pipeline():
    return TextToVideoPipeline(
        TextDrivenVelocity(),
        build_vae(None, seed=0),
        build_text_encoder(None, 16, 32),
        latent_channels=16,
        patch_size=(1, 2, 2),
    )


def test_pipeline_generates_videos_of_the_requested_size(pipeline):
    """Two prompts give a float video [2, 3, F, H, W] in [-1, 1]; the model sees [2B] batches with guidance."""
    pipeline.model.calls.clear()
    video = pipeline(
        ["a red circle moving left", "a blue square"],
        num_frames=9,
        height=32,
        width=32,
        num_steps=3,
        guidance_scale=4.0,
        seed=1,
    )
    assert video.shape == (2, 3, 9, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert pipeline.model.calls == [((4, 16, 3, 4, 4), (4,), (4, 32, 16))] * 3


def test_same_seed_same_video_and_prompts_matter(pipeline):
    """Generation is reproducible from the seed, and another prompt changes the result."""
    kwargs = dict(num_frames=5, height=16, width=16, num_steps=2, guidance_scale=1.0, seed=3)
    first = pipeline("a red circle", **kwargs)
    assert torch.equal(first, pipeline("a red circle", **kwargs))
    assert not torch.equal(first, pipeline("a white tall bar", **kwargs))


def test_incompatible_sizes_name_the_constraint(pipeline):
    """Frames that are not 1 + 4k, or sizes whose latent grid the patch does not divide, raise ConfigError."""
    with pytest.raises(ConfigError, match="num_frames.*temporal stride"):
        pipeline("x", num_frames=8, height=16, width=16, num_steps=1)
    with pytest.raises(ConfigError, match="width=24.*patch size 2"):
        pipeline("x", num_frames=5, height=16, width=24, num_steps=1)


def test_latent_channels_must_match_the_vae():
    """A model with other latent channels than the VAE is refused at construction."""
    with pytest.raises(ConfigError, match="latent_channels"):
        TextToVideoPipeline(TextDrivenVelocity(), build_vae(None), build_text_encoder(None, 16, 8), latent_channels=4)


def test_generate_writes_one_mp4_per_prompt(pipeline, tmp_path):
    """generate(SampleConfig) writes readable .mp4 files with the requested frame count and size."""
    config = SampleConfig(
        prompt=["a red circle", "a green square"],
        num_steps=2,
        num_frames=5,
        height=32,
        width=48,
        fps=8,
        output=str(tmp_path / "out" / "clip.mp4"),
    )
    paths = pipeline.generate(config, progress=False)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["clip-000.mp4", "clip-001.mp4"]
    for path in paths:
        assert read_video(path).shape == (5, 32, 48, 3)


def test_sample_config_defaults_and_validation():
    """Defaults are Wan's (50 steps, shift 5, guidance 5, 81 frames); bad values name sample.<key>."""
    config = SampleConfig().validate()
    assert (config.num_steps, config.shift, config.guidance_scale, config.num_frames) == (50, 5.0, 5.0, 81)
    with pytest.raises(ConfigError, match=r"sample\.num_frames"):
        SampleConfig(num_frames=80).validate()
    with pytest.raises(ConfigError, match=r"infer\.height"):
        SampleConfig(height=100).validate(prefix="infer")
    with pytest.raises(ConfigError, match=r"sample\.output"):
        SampleConfig(output="clip.avi").validate()
    with pytest.raises(ConfigError, match=r"sample\.prompt"):
        SampleConfig(prompt=[]).validate()
    with pytest.raises(ConfigError, match=r"sample\.shift"):
        SampleConfig(shift=0).validate()
