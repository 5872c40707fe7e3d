"""Shared fixtures for the data tests: one small synthetic shard set per test session.

Tests that modify shards copy them first, so the shared set stays intact.
"""

import pytest

from osp_megatron.data.config import DataConfig
from osp_megatron.data.synthetic import make_synthetic_shards

LATENT_SHAPE = (16, 2, 4, 6)
TEXT_LEN = 32
TEXT_DIM = 16


@pytest.fixture
def make_config():
    """Factory of DataConfigs matching the shared shard set, with field overrides."""

    def build(path, **overrides):
        c, t, h, w = LATENT_SHAPE
        fields = dict(path=path if isinstance(path, list) else str(path), latent_channels=c, latent_frames=t,
                      latent_height=h, latent_width=w, text_len=TEXT_LEN, text_dim=TEXT_DIM, num_workers=0,
                      shuffle=True, synthetic_seed=3)
        fields.update(overrides)
        return DataConfig(**fields)

    return build


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """50 samples in shards of 8 (the last one holds 2), so epochs and ranks cut through shards."""
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(str(folder), 50, 8, LATENT_SHAPE, TEXT_LEN, TEXT_DIM, seed=3)
    return folder
