"""model.activation_checkpointing: none, full and selective give the same losses and gradients, and keep
successively fewer bytes for the backward."""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.optim import average_gradients
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ParallelConfig, ensure_single_rank_group, init_distributed

# (model fields, latent [T, H, W]): the hybrid model (full first and last blocks) on a grid Skiparse needs no
# padding for, and on a grid that needs padding (the packed layout) with consecutive sparse blocks.
CASES = {
    "hybrid": ({"sparse_ratio": 2}, (2, 16, 16)),
    "hybrid_packed": ({"sparse_ratio": 2, "block_layout": ["full", "token", "group", "full"]}, (1, 12, 16)),
}


def _model(fields):
    torch.manual_seed(3)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "full_blocks": 1, **fields}, "model"))
    torch.manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():  # every weight matters (the output head starts at zero)
            param.normal_(0.0, 0.05)
    return model


def _loss_and_gradients(model, mode, latent_shape):
    model.activation_checkpointing = mode
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, *latent_shape, generator=generator)
    text, target = torch.randn(2, 32, 32, generator=generator), torch.randn(latents.shape, generator=generator)
    loss = (model(latents, torch.tensor([30.0, 800.0]), text) - target).square().mean()
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def _assert_same(result, reference, what):
    loss, grads = result
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=0, msg=f"{what}: loss")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-5, atol=1e-7, msg=f"{what}: gradient of {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_modes_give_identical_losses_and_gradients(case):
    """Full and selective recomputation reproduce the loss and every parameter gradient of no recomputation."""
    ensure_single_rank_group()
    fields, latent_shape = CASES[case]
    model = _model(fields)
    reference = _loss_and_gradients(model, "none", latent_shape)
    for mode in ("full", "selective"):
        _assert_same(_loss_and_gradients(model, mode, latent_shape), reference, f"{case} {mode}")


def _sequence_parallel_run(rank, world_size, ssp, ulysses):
    init_distributed(ParallelConfig(ssp=ssp, ulysses=ulysses))
    fields, latent_shape = CASES["hybrid"]
    model = _model(fields)
    results = {}
    for mode in ("full", "selective"):
        loss, _ = _loss_and_gradients(model, mode, latent_shape)
        average_gradients(model, torch.distributed.group.WORLD, world_size)
        results[mode] = (loss, {name: param.grad.clone() for name, param in model.named_parameters()})
    return results


@pytest.mark.slow
def test_checkpointing_modes_under_sequence_parallelism_equal_single_rank():
    """With SSP=2 on two gloo ranks (switch all-to-alls, Ulysses in the full blocks' attention core) full and
    selective recomputation give the single-rank loss and gradients."""
    ensure_single_rank_group()
    fields, latent_shape = CASES["hybrid"]
    reference = _loss_and_gradients(_model(fields), "none", latent_shape)
    ranks = run_on_ranks(_sequence_parallel_run, 2, 2, 1)
    for rank, results in enumerate(ranks):
        for mode, result in results.items():
            loss, grads = result
            torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=0, msg=f"rank {rank} {mode}: loss")
            for name, grad in grads.items():
                scale = float(reference[1][name].abs().max())
                torch.testing.assert_close(
                    grad,
                    reference[1][name],
                    rtol=1e-4,
                    atol=1e-5 * scale,
                    msg=f"rank {rank} {mode}: gradient of {name}",
                )


def test_true_and_false_mean_full_and_none():
    """YAML booleans keep working: true is full recomputation, false none; other values name the key."""
    assert from_dict(ModelConfig, {"activation_checkpointing": True}, "model").activation_checkpointing == "full"
    assert from_dict(ModelConfig, {"activation_checkpointing": False}, "model").activation_checkpointing == "none"
    assert ModelConfig(activation_checkpointing=True).activation_checkpointing == "full"
    assert (
        from_dict(ModelConfig, {"activation_checkpointing": "selective"}, "model").activation_checkpointing
        == "selective"
    )
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        from_dict(ModelConfig, {"activation_checkpointing": "some"}, "model")


def _kept_block_bytes(model, mode, latent_shape) -> int:
    """Bytes the second block keeps for the backward in `mode` (bf16 autocast), counted by storage."""
    from osp_megatron.training.activation_profile import SavedTensorCensus

    model.activation_checkpointing = mode
    census = SavedTensorCensus(model, model.blocks[1])
    generator = torch.Generator().manual_seed(5)
    latents, text = torch.randn(1, 16, *latent_shape, generator=generator), torch.randn(1, 32, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), census.recording():
        out = model(latents, torch.tensor([30.0]), text)
    kept = census.kept()  # while `out` holds the graph
    del out
    return kept["block"] + kept["block_weights"]


@pytest.mark.parametrize("case", list(CASES))
def test_saved_bytes_shrink_from_none_to_selective_to_full(case):
    """What a block keeps for the backward: everything > the attention core's tensors and the input > the
    input alone (2 bytes per channel and token in bf16)."""
    ensure_single_rank_group()
    fields, latent_shape = CASES[case]
    model = _model(fields)
    kept = {mode: _kept_block_bytes(model, mode, latent_shape) for mode in ("none", "selective", "full")}
    assert kept["none"] > kept["selective"] > kept["full"]
    tokens = latent_shape[0] * latent_shape[1] * latent_shape[2] // 4
    assert kept["full"] == 2 * model.model_config.dim * tokens
