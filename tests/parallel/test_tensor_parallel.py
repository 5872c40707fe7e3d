"""Tensor parallelism: a TP=2 model on two gloo ranks computes what the TP=1 model computes."""

import pytest
import torch

from osp_megatron.checkpointing.sharded import partition_dim
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ParallelConfig, init_distributed
from osp_megatron.testing import gathered_gradients
from osp_megatron.training.flow_matching import flow_matching_loss

pytestmark = pytest.mark.slow  # every test starts gloo ranks (run_on_ranks)


def _loss_and_full_grads(rank, world_size, model_overrides):
    init_distributed(ParallelConfig(tensor=world_size))
    torch.manual_seed(7)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", **model_overrides}, "model"))
    for param in model.parameters():  # make every weight matter (the head starts at zero)
        torch.nn.init.normal_(param, std=0.05) if partition_dim(param) is None else None
    torch.manual_seed(11)
    latents, text = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 16, 32)
    loss = flow_matching_loss(model, latents, text, torch.Generator().manual_seed(3))
    loss.backward()
    return float(loss), gathered_gradients(model, world_size)


def test_tensor_parallel_two_ranks_equals_one_rank():
    """TP=2 gives the same loss and the same (gathered) gradient of every parameter as TP=1."""
    # Replicated weights are re-drawn after building, from the same seed on every rank, so both runs agree.
    ((loss_1, grads_1),) = run_on_ranks(_loss_and_full_grads, 1, {})
    loss_2a, grads_2 = run_on_ranks(_loss_and_full_grads, 2, {})[0]
    assert abs(loss_1 - loss_2a) < 1e-6 * max(1.0, abs(loss_1))
    assert grads_1.keys() == grads_2.keys()
    for name in grads_1:
        scale = grads_1[name].abs().max().clamp(min=1e-8)
        assert torch.allclose(grads_1[name], grads_2[name], atol=1e-5 * float(scale), rtol=1e-4), name
