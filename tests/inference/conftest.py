"""Shared fixtures of the inference tests: a one-rank process group for tests that load DiTs in-process."""

import pytest


@pytest.fixture(scope="module")
def single_rank_device():
    """The device of a one-rank group (set up for this module, torn down after it so later tests can fork ranks)."""
    from osp_megatron.parallel.state import destroy_distributed, ensure_single_rank_group

    yield ensure_single_rank_group()
    destroy_distributed()
