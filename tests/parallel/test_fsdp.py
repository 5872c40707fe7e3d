"""FSDP over data-parallel ranks trains exactly as one rank does and composes with quantized linears (osp-train's
own tests add tensor and sequence parallelism and resuming under other layouts: tests/training/).

Each case runs the same few optimizer steps (AdamW, clipping that bites, EMA) on the same global batches,
noise drawn per sample from (seed, sample index); the single-rank run is the reference.
"""

from pathlib import Path

import pytest
import torch

from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.testing import assert_same_training_state

pytestmark = pytest.mark.slow  # every test starts gloo ranks (run_on_ranks)

GLOBAL_BATCH, STEPS, SEED = 4, 4, 11
MODEL = {"preset": "tiny", "num_layers": 3, "sparse_ratio": 2, "full_blocks": 1}


def _sample(index: int):
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.randn(16, 3, 16, 16, generator=generator), torch.randn(32, 32, generator=generator)


def _train(rank, world_size, layout, fsdp, steps, save_at=(), options=None):
    """`steps` optimizer steps under layout (tensor, ssp, data), checkpoints after the steps in `save_at` (into
    save_at's folder); returns the global-batch losses and gradient norms of the steps run. options: quant
    (a quant.recipe), ema_device ("cpu"), recompute (activation checkpointing)."""
    import torch.distributed as dist

    from osp_megatron.checkpointing.distributed import training_tensors
    from osp_megatron.checkpointing.metadata import current_layout
    from osp_megatron.checkpointing.sharded import partition_dim
    from osp_megatron.checkpointing.writer import CheckpointWriter
    from osp_megatron.config.loader import from_dict
    from osp_megatron.engine.config import TrainConfig
    from osp_megatron.engine.optim import EMA, average_gradients, build_optimizer, clip_gradients
    from osp_megatron.engine.parallelize import parallelize_dit
    from osp_megatron.models.builder import build_model
    from osp_megatron.models.config import ModelConfig
    from osp_megatron.parallel import state
    from osp_megatron.parallel.state import ParallelConfig, init_distributed
    from osp_megatron.quantization.config import QuantConfig
    from osp_megatron.training.flow_matching import PerSampleNoise, flow_matching_loss

    options = options or {}
    tensor, ssp, data = layout
    init_distributed(ParallelConfig(tensor=tensor, ssp=ssp))
    torch.manual_seed(7)
    model = build_model(
        from_dict(ModelConfig, {**MODEL, "activation_checkpointing": options.get("recompute", False)}, "model")
    )
    torch.manual_seed(8)
    for param in model.parameters():  # every weight matters (the output head starts at zero)
        if partition_dim(param) is None:
            torch.nn.init.normal_(param, std=0.05)
    # The engine's parallelize_dit applies the token layout, quantization and FSDP, as every job does.
    quant = from_dict(QuantConfig, {"recipe": options["quant"]}, "quant") if "quant" in options else None
    parallelize_dit(
        model, parallel=ParallelConfig(tensor=tensor, ssp=ssp, fsdp=fsdp), quant=quant, device=torch.device("cpu")
    )
    # AdamW's eps sits far below the real gradients here but far above rounding noise, which Adam would
    # otherwise scale up to full-size steps on gradients that are zero in exact arithmetic (the key bias's).
    optimizer = build_optimizer(model, TrainConfig(lr=2e-3, adam_eps=1e-6))
    ema = EMA(model, 0.8, options.get("ema_device"))
    per_rank = GLOBAL_BATCH // data
    replica = state.data_parallel_rank()
    writer = CheckpointWriter(Path(save_at[0])) if save_at else None
    losses, norms = [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        indices = torch.arange(per_rank) + step * GLOBAL_BATCH + replica * per_rank
        latents, text = (torch.stack(t) for t in zip(*(_sample(int(i)) for i in indices)))
        loss = flow_matching_loss(model, latents, text, PerSampleNoise(SEED, indices))
        loss.backward()
        if not fsdp:
            group = state.gradient_reduction_group()
            average_gradients(model, group, dist.get_world_size(group))
        norms.append(float(clip_gradients(model, 0.05)))
        optimizer.step()
        ema.update(model)
        total = loss.detach().clone()
        dist.all_reduce(total, group=state.data_parallel_group())
        losses.append(float(total) / data)
        if step + 1 in save_at[1:]:
            tensors = training_tensors(model, optimizer, ema)
            writer.save(
                f"step_{step + 1:08d}", tensors, {"step": step + 1}, {"step": step + 1, "layout": current_layout(fsdp)}
            )
    if writer is not None:
        writer.close()
    return losses, norms


def _close(values, expected, what):
    for step, (value, reference) in enumerate(zip(values, expected)):
        assert abs(value - reference) <= 1e-5 * max(1.0, abs(reference)), (what, step, value, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, no FSDP: losses and gradient norms of STEPS steps, a checkpoint after the last."""
    root = tmp_path_factory.mktemp("fsdp_reference")
    losses, norms = run_on_ranks(_train, 1, (1, 1, 1), False, STEPS, (root, STEPS))[0]
    return root, losses, norms


def test_fsdp_at_data2_equals_single_rank(reference, tmp_path):
    """FSDP over data=2, with every block recomputed in backward (activation checkpointing through FSDP's
    gathered blocks) and the EMA in host memory (blended by its background thread), gives the single-rank
    losses and gradient norms, and the same weights, EMA and optimizer state after the last step (1e-5)."""
    root, losses, norms = reference
    results = run_on_ranks(
        _train, 2, (1, 1, 2), True, STEPS, (tmp_path, STEPS), {"recompute": True, "ema_device": "cpu"}
    )
    for rank_losses, rank_norms in results:
        _close(rank_losses, losses, "data2 loss")
        _close(rank_norms, norms, "data2 grad norm")
    assert_same_training_state(tmp_path / f"step_{STEPS:08d}", root / f"step_{STEPS:08d}")


def test_fsdp_composes_with_fp8_current_scaling(tmp_path):
    """quant.recipe=fp8_hybrid (current scaling, emulated on CPU) under FSDP quantizes the gathered weights as
    the replicated path quantizes its own: same losses at data=2 (1e-5). (One rank differs: activation scales
    come from each replica's own micro-batch.)"""
    options = {"quant": "fp8_hybrid"}
    expected, _ = run_on_ranks(_train, 2, (1, 1, 2), False, 2, (), options)[0]
    for losses, _ in run_on_ranks(_train, 2, (1, 1, 2), True, 2, (), options):
        _close(losses, expected, "fp8_hybrid loss")
