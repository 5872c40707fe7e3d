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


def test_sincos_positions_tell_every_token_apart():
    """The absolute position table gives each token of a (T, H, W) grid its own row, built per axis from the
    channels rope_split assigns: sines then cosines of position times frequency; position 0 is sin 0, cos 1."""
    from osp_megatron.attention.rope import rope_split, sincos_positions

    table = sincos_positions((3, 4, 5), 64)[0]
    assert table.shape == (60, 64)
    assert torch.cdist(table, table).add(torch.eye(60)).min() > 0.1
    t_dim, h_dim, _ = rope_split(64)
    grid = table.view(3, 4, 5, 64)
    torch.testing.assert_close(grid[:, 2, 3, :t_dim], grid[:, 0, 0, :t_dim])  # time channels follow t only
    row = grid[0, 1, 0, t_dim : t_dim + h_dim]
    frequencies = 10000.0 ** (-torch.arange(0, h_dim, 2, dtype=torch.float64) / h_dim)
    torch.testing.assert_close(row, torch.cat([frequencies.sin(), frequencies.cos()]).float())
    assert torch.equal(grid[0, 0, 0, t_dim:], torch.cat([torch.zeros(h_dim // 2), torch.ones(h_dim // 2)] * 2))


def test_absolute_positions_add_no_weights_and_place_content():
    """model.absolute_positions keeps the parameters (a checkpoint loads either way) and, unlike RoPE alone,
    makes the output depend on where in the grid a token is: shifted input gives an output that is not merely
    shifted."""
    torch.manual_seed(0)
    plain = build_model(tiny(num_layers=1))
    placed = build_model(tiny(num_layers=1, absolute_positions=True))
    placed.load_state_dict(plain.state_dict())
    for param in placed.parameters():
        torch.nn.init.normal_(param, std=0.05)
    plain.load_state_dict(placed.state_dict())
    # A grid the same everywhere in space: without absolute positions every location gives the same output.
    latents = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 1, 4, 4).contiguous()
    args = (torch.tensor([500.0]), torch.randn(1, 6, 32))
    same = plain(latents, *args)
    assert torch.allclose(same, same[..., :2, :2].repeat(1, 1, 1, 2, 2), atol=1e-5)
    varied = placed(latents, *args)
    assert not torch.allclose(varied, varied[..., :2, :2].repeat(1, 1, 1, 2, 2), atol=1e-3)
