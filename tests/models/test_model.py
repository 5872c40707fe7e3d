"""The Wan2.1 DiT: output shapes, published parameter counts, input checks."""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.builder import build_model, count_parameters
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ensure_single_rank_group


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    ensure_single_rank_group()


def tiny(**fields):
    return from_dict(ModelConfig, {"preset": "tiny", **fields}, "model")


@pytest.mark.parametrize("patch, shape", [([1, 2, 2], (3, 8, 12)), ([2, 2, 2], (4, 6, 10)), ([1, 1, 1], (2, 3, 5))])
def test_forward_returns_velocity_of_latent_shape(patch, shape):
    """forward(latents [B,C,T,H,W], t [B], text [B,L,D]) -> [B,C,T,H,W] for several patch sizes."""
    torch.manual_seed(0)
    model = build_model(tiny(patch_size=patch, num_layers=2))
    latents = torch.randn(2, 16, *shape)
    out = model(latents, torch.tensor([10.0, 900.0]), torch.randn(2, 32, 32))
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_parameter_counts_of_published_presets():
    """wan-1.3b has about 1.42B and wan-14b about 14.3B parameters (counted on the meta device)."""
    small = count_parameters(build_model(tiny(preset="wan-1.3b"), meta=True))
    large = count_parameters(build_model(tiny(preset="wan-14b"), meta=True))
    assert 1.40e9 < small < 1.44e9
    assert 14.0e9 < large < 14.5e9


def test_tiny_parameter_count_is_exact():
    """The tiny preset's count follows from its dimensions (guards accidental architecture changes)."""
    cfg = tiny()
    d, f, t, fq, c = cfg.dim, cfg.ffn_dim, cfg.text_dim, cfg.freq_dim, cfg.in_channels
    per_block = 6 * d + 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (d * f + f) + (f * d + d)
    embed = (c * 4 * d + d) + (t * d + d) + (d * d + d) + (fq * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    head = 2 * d + d * c * 4 + c * 4
    assert count_parameters(build_model(cfg)) == embed + cfg.num_layers * per_block + head


def test_bad_latent_shapes_are_named():
    """Latents that do not patchify, or have the wrong channel count, raise errors that say so."""
    model = build_model(tiny(num_layers=1))
    with pytest.raises(ConfigError, match="patch_size"):
        model(torch.randn(1, 16, 3, 7, 8), torch.tensor([1.0]), torch.randn(1, 4, 32))
    with pytest.raises(ConfigError, match="in_channels"):
        model(torch.randn(1, 8, 3, 8, 8), torch.tensor([1.0]), torch.randn(1, 4, 32))
