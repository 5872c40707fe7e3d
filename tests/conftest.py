"""Fixtures shared across test folders: a tiny sampling checkpoint (osp-sample and osp-eval render from it)."""

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A run folder holding one complete checkpoint of utils.testing's tiny hybrid sampling model."""
    from osp_megatron.testing import save_tiny_sampling_checkpoint

    run = tmp_path_factory.mktemp("run")
    save_tiny_sampling_checkpoint(run)
    return run
