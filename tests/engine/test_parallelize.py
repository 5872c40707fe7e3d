"""parallelize_dit and the job model: what each role gets, and a model built on the meta device whose weights are
read straight into each rank's FSDP shard (no rank holds the whole model)."""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.config import JobConfig, LoraConfig
from osp_megatron.engine.parallelize import parallelize_dit
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.config import ParallelConfig
from osp_megatron.parallel.state import ensure_single_rank_group
from osp_megatron.quantization.config import QuantConfig
from osp_megatron.quantization.linear import quantized_modules

TINY = {"preset": "tiny", "num_layers": 2, "activation_checkpointing": "full"}


def _model():
    ensure_single_rank_group()
    return build_model(from_dict(ModelConfig, TINY, "model"))


def test_roles():
    """train keeps gradients and the model's checkpointing; frozen keeps no gradient; inference keeps none, turns
    recomputation off and quantizes in the inference form (weights once); FSDP is refused for inference."""
    quant = QuantConfig(recipe="hif8")
    trained = _model()
    done = parallelize_dit(trained, "train", quant=quant, lora=LoraConfig(rank=2, alpha=4.0))
    assert done.quantized and done.adapted and not done.fsdp
    assert trained.activation_checkpointing == "full"
    assert {name for name, p in trained.named_parameters() if p.requires_grad} == {
        name for name, _ in trained.named_parameters() if "lora_" in name
    }
    # Quantization comes before LoRA: the base linears are quantized, the adapters are not.
    names = set(done.quantized)
    assert "blocks.0.self_attention.linear_q" in names and not any("lora_" in name for name in names)
    frozen = _model()
    parallelize_dit(frozen, "frozen")
    assert not any(p.requires_grad for p in frozen.parameters())
    sampling = _model()
    parallelize_dit(sampling, "inference", quant=quant)
    assert sampling.activation_checkpointing == "none" and not any(p.requires_grad for p in sampling.parameters())
    assert all(state.inference for state in quantized_modules(sampling).values())
    with pytest.raises(ConfigError, match="parallel.fsdp shards a model for training"):
        parallelize_dit(_model(), "inference", parallel=ParallelConfig(fsdp=True))
    with pytest.raises(ConfigError, match="selects no linear layer"):
        parallelize_dit(
            _model(),
            "train",
            quant=from_dict(QuantConfig, {"recipe": "hif8", "modules": {"include": ["nothing*"]}}, "quant"),
        )


def test_compilation_compiles_every_block():
    model = _model()
    parallelize_dit(model, "train", compile=True)
    assert all(block._compiled_call_impl is not None for block in model.blocks)


def _sharded_from_checkpoint(rank, world_size, checkpoint):
    from torch.distributed.tensor import DTensor

    from osp_megatron.engine.model import build_job_model
    from osp_megatron.parallel.state import init_distributed

    init_distributed(ParallelConfig(backend="gloo"))
    config = from_dict(JobConfig, {"model": TINY, "parallel": {"fsdp": True}})
    built = build_job_model(config, torch.device("cpu"), "train", weights=checkpoint)
    local = {name: p.to_local().clone() for name, p in built.module.named_parameters()}
    full = {name: p.full_tensor().clone() for name, p in built.module.named_parameters()}
    assert all(isinstance(p, DTensor) for p in built.module.parameters())
    return local, full


@pytest.mark.slow
def test_weights_load_straight_into_fsdp_shards(tmp_path):
    """A model built on the meta device and sharded over 2 ranks holds, on each rank, its dim-0 half of every
    weight of the checkpoint, read straight into place; together the shards are the checkpoint's weights."""
    from osp_megatron.checkpointing.checkpoint import save_checkpoint
    from osp_megatron.checkpointing.offline import read_checkpoint_tensors

    model = _model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    path = save_checkpoint(tmp_path, 1, model)
    stored = read_checkpoint_tensors(path)
    ranks = run_on_ranks(_sharded_from_checkpoint, 2, str(path))
    for name, tensor in stored.items():
        torch.testing.assert_close(ranks[0][1][name], tensor, rtol=0, atol=0)
        for rank, (local, _) in enumerate(ranks):
            chunks = torch.chunk(tensor, 2, dim=0)
            expected = chunks[rank] if rank < len(chunks) else tensor[:0]
            torch.testing.assert_close(local[name], expected, rtol=0, atol=0)
    total = sum(t.numel() for t in stored.values())
    assert all(sum(t.numel() for t in local.values()) <= 0.55 * total for local, _ in ranks)
