"""Shared pieces of the GRPO tests: a tiny model and a seconds-long osp-grpo configuration."""

import pytest
import torch

from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import ModelConfig
from osp_megatron.testing import tiny_grpo_overrides


def build_tiny_model(num_layers: int = 2):
    """A tiny DiT, the same for the same arguments, with a non-zero output head (the zero-initialised head
    predicts v = 0 everywhere)."""
    from osp_megatron.models.builder import build_model
    from osp_megatron.parallel.state import ensure_single_rank_group

    ensure_single_rank_group()
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "num_layers": num_layers}, "model"))
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    return model


@pytest.fixture
def grpo_overrides():
    return tiny_grpo_overrides


@pytest.fixture
def make_tiny_model():
    return build_tiny_model


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()
