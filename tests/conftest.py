"""Session-wide test fixtures: a private model cache (the tiny fitted VAE is fitted at most once per session)
and a tiny sampling checkpoint (osp-sample and osp-eval render from it).

Subprocesses inherit the cache through $OSP_MEGATRON_CACHE; nothing is written to the user's own cache.
"""

import os

import pytest

from osp_megatron.utils.cache import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("osp_megatron_cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def fitted_vae(private_model_cache):
    """The tiny fitted VAE of the default settings (the one examples/tiny_t2v.yaml uses), as a VideoVAE."""
    from osp_megatron.models.vae import build_vae

    return build_vae(None, tiny="tiny-fitted")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A run folder holding one complete checkpoint of utils.testing's tiny hybrid sampling model."""
    from osp_megatron.utils.testing import save_tiny_sampling_checkpoint

    run = tmp_path_factory.mktemp("run")
    save_tiny_sampling_checkpoint(run)
    return run
