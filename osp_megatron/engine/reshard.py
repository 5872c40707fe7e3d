"""Resharding a checkpoint offline: CPU ranks of the target layout build the model as a job would, load, save.

Behind `osp-ckpt reshard`; a LoRA checkpoint keeps its adapters and base reference (docs/sharding.md).
"""

from collections.abc import Callable
from pathlib import Path

import torch

from osp_megatron.checkpointing.base_weights import LORA_KEY, lora_metadata, resolve_base
from osp_megatron.checkpointing.checkpoint import checkpoint_metadata, load_checkpoint
from osp_megatron.checkpointing.distributed import training_tensors
from osp_megatron.checkpointing.metadata import describe_layout, read_metadata
from osp_megatron.checkpointing.offline import stored_kinds
from osp_megatron.checkpointing.wan_convert import silent
from osp_megatron.checkpointing.wan_export import checkpoint_model_config
from osp_megatron.checkpointing.writer import CheckpointWriter
from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.config import JobConfig, LoraConfig, TrainConfig
from osp_megatron.engine.model import build_resumable_model
from osp_megatron.engine.optim import EMA, build_optimizer
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.parallel.config import ParallelConfig
from osp_megatron.parallel.state import init_distributed


def reshard_checkpoint(
    source: str | Path,
    output: str | Path,
    tensor: int = 1,
    data: int = 1,
    ssp: int = 1,
    ulysses: int = 1,
    fsdp: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = silent,
) -> Path:
    """Rewrite a checkpoint (either format) as a run with this layout writes it: its weights, EMA and optimizer
    state in the pieces those ranks hold, with their per-rank state. Runs tensor x data x ssp x ulysses CPU
    ranks (gloo) through the jobs' own model building, load and save; the ranks together need about the
    checkpoint's size in memory (a LoRA checkpoint's base included)."""
    source, output = Path(source), Path(output)
    metadata = read_metadata(source)
    if output.exists() and not overwrite:
        raise ConfigError(f"output {str(output)!r} already exists; pass --overwrite to replace it")
    world = tensor * data * ssp * ulysses
    layout = {"tensor": tensor, "ssp": ssp, "ulysses": ulysses, "fsdp": fsdp}
    run_on_ranks(_reshard_rank, world, str(source), str(output), layout, timeout=24 * 3600)
    log(
        f"resharded {source} (step {metadata.get('step')}) into {output} for "
        f"{describe_layout(read_metadata(output)['layout'])}"
    )
    return output


def _reshard_rank(rank: int, world_size: int, source: str, output: str, layout: dict) -> None:
    """One CPU rank of reshard_checkpoint: build the model of the checkpoint, load, save."""
    source, output = Path(source), Path(output)
    parallel = ParallelConfig(
        tensor=layout["tensor"], ssp=layout["ssp"], ulysses=layout["ulysses"], backend="gloo", fsdp=layout["fsdp"]
    )
    init_distributed(parallel)
    lora = lora_metadata(source)
    config = JobConfig(
        parallel=parallel, model=checkpoint_model_config(source), lora=LoraConfig(**lora[LORA_KEY]) if lora else None
    )
    built = build_resumable_model(config, torch.device("cpu"), resolve_base(source) if lora else None)
    kinds = stored_kinds(source)
    optimizer = build_optimizer(built.module, TrainConfig()) if "optimizer" in kinds else None
    ema = EMA(built.module, 0.5) if "ema" in kinds else None
    parameters = built.stored_parameters()
    metadata, rank_state = load_checkpoint(source, built.module, optimizer, ema, parameters=parameters)
    kept = {
        key: value
        for key, value in metadata.items()
        if key not in ("format", "saved_at", "layout", "tensor_parallel", "world_size")
    }
    kept["resharded_from"] = str(source)
    writer = CheckpointWriter(output.parent, update_latest=False)
    writer.save(
        output.name,
        training_tensors(built.module, optimizer, ema, parameters=parameters),
        rank_state,
        checkpoint_metadata(int(metadata.get("step", 0)), layout["fsdp"], kept),
    )
