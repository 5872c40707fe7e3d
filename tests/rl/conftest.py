"""Shared pieces of the GRPO tests: a tiny model and a seconds-long osp-grpo configuration."""

import pytest
import torch

from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import ModelConfig


def tiny_grpo_overrides(run_dir, steps: int = 2, extra=()) -> list[str]:
    """osp-grpo overrides for a run of a few seconds: 2-block model, 5 x 32 x 32 videos through the random tiny
    VAE, 4 rollout steps; torch's threads left as they are (the tests run in the test process)."""
    return [f"run.dir={run_dir}", f"train.steps={steps}", "train.progress=false", "train.sample_at_end=false",
            "train.lr=1e-3", "train.min_lr=1e-3", "train.micro_batch_size=2", "model.num_layers=2",
            "model.vae=tiny-random", "checkpoint.load=null", "checkpoint.interval=0", "grpo.num_steps=4",
            "grpo.window_size=2", "grpo.window_mode=sliding", "grpo.group_size=2", "grpo.prompts_per_iteration=2",
            "grpo.rewards=[{name: temporal_flicker}]", "grpo.pretrain_if_missing=null", "grpo.eval_interval=0",
            "grpo.decode_batch_size=2", "train.cpu_threads=0",
            "prompts.synthetic=false", "prompts.prompts=[a red circle moving left, a blue square moving up, "
            "a green wide bar staying still]", "sample.num_frames=5", "sample.height=32", "sample.width=32",
            "sample.guidance_scale=2.0", *extra]


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
