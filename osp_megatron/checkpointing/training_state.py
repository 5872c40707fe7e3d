"""Reading a training checkpoint back under the current parallel layout, whatever layout wrote it.

Distributed (format 2) checkpoints reshard in torch.distributed.checkpoint; tensor-parallel safetensors
checkpoints (format 1) are re-split for tensor parallelism and FSDP here.
"""

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from osp_megatron.checkpointing.distributed import (
    EMA,
    MODEL,
    OPTIMIZER,
    load_tensors,
    local_piece,
    stored_like,
    training_tensors,
)
from osp_megatron.checkpointing.integrity import CheckpointCorruptError, verify_file
from osp_megatron.checkpointing.metadata import STATE, is_distributed_format, read_metadata, same_layout
from osp_megatron.checkpointing.offline import stored_kinds, stored_shapes
from osp_megatron.checkpointing.sharded import read_local_tensor, source_layout
from osp_megatron.checkpointing.writer import rank_file
from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import is_fsdp_model


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    ema=None,
    which: tuple | None = None,
    parameters: list[str] | None = None,
) -> tuple[dict, dict]:
    """Collective: restore model weights, EMA and AdamW state into this rank's pieces; returns (metadata, the
    per-rank state: this rank's under an unchanged layout, else rank 0's).

    `which` limits what is read (default: everything the run has and the checkpoint holds); `parameters` the
    weights read (default all: a LoRA model reads its adapters only). A checkpoint
    without EMA restarts the EMA from the loaded weights; one without optimizer state starts AdamW afresh.
    """
    path = Path(path)
    metadata = read_metadata(path)
    kinds = set(stored_kinds(path))
    wanted = set(which or (MODEL, EMA, OPTIMIZER))
    if MODEL not in kinds and MODEL in wanted:
        raise ConfigError(f"checkpoint {str(path)!r} holds no model weights")
    selected = {MODEL} & wanted
    for kind, present in ((EMA, ema), (OPTIMIZER, optimizer)):
        if kind not in wanted or present is None:
            continue
        if kind in kinds:
            selected.add(kind)
        else:
            warnings.warn(
                f"checkpoint {path} holds no {kind} state: "
                f"{'the EMA restarts from the loaded weights' if kind == EMA else 'AdamW starts afresh'}"
            )
    tensors = training_tensors(
        model, optimizer, ema, which=tuple(selected), create_optimizer_state=True, parameters=parameters
    )
    if is_distributed_format(metadata):
        load_tensors(path / STATE, tensors)
    else:
        load_tensor_parallel_safetensors(path, tensors)
    if ema is not None and EMA in wanted and EMA not in selected:
        ema.restart_from(model)
    return metadata, read_rank_state(path, metadata, is_fsdp_model(model))


def load_weights(
    path: str | Path,
    model: torch.nn.Module,
    which: str = MODEL,
    strict: bool = True,
    names: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Collective: copy a checkpoint's model (or, which="ema", EMA) weights into `model`, any format, any
    layout. `names` maps the model's parameter names to the stored ones (default: the same, every parameter),
    e.g. a LoRA model's base weights. Returns (missing, unexpected) stored names; strict makes either an error."""
    path = Path(path)
    metadata = read_metadata(path)
    stored = set(stored_shapes(path, which))
    if not stored:
        raise ConfigError(f"checkpoint {str(path)!r} has no {which!r} weights")
    params = dict(model.named_parameters())
    names = names if names is not None else {name: name for name in params}
    missing, unexpected = sorted(set(names.values()) - stored), sorted(stored - set(names.values()))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"{which} weights of {str(path)!r} do not match the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    tensors = {
        f"{which}/{stored_name}": stored_like(params[name], params[name])
        for name, stored_name in names.items()
        if stored_name in stored
    }
    if is_distributed_format(metadata):
        load_tensors(path / STATE, tensors)
    else:
        load_tensor_parallel_safetensors(path, tensors)
    return missing, unexpected


def read_rank_state(path: Path, metadata: dict, fsdp: bool) -> dict:
    """This rank's saved state (data position, RNG, quantization scales) under an unchanged layout; under
    another layout rank 0's, whose layout-free parts (step, scales, global data position) apply to all."""
    rank = dist.get_rank() if same_layout(metadata, fsdp) else 0
    file = rank_file(path, rank)
    if not file.is_file():
        return {}
    verify_file(file)
    try:
        return torch.load(file, weights_only=False)
    except Exception as exc:  # pickle and zip errors of a damaged file
        raise CheckpointCorruptError(f"{file}: cannot be read ({exc})") from exc


def load_tensor_parallel_safetensors(path: Path, tensors: dict) -> None:
    """Fill `tensors` (training_tensors keys) from a format-1 checkpoint: each stored tensor-parallel slice
    is re-split for this run's tensor-parallel size, then cut to this rank's FSDP shard."""
    tp_rank, tp_size = state.tensor_parallel_rank(), state.tensor_parallel_size()
    by_folder: dict[str, dict] = {}
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        by_folder.setdefault(kind, {})[name] = value
    for kind, targets in by_folder.items():
        folder = path / kind
        _, paths, partition = source_layout(folder)
        moments = {name: value for name, value in targets.items() if not name.startswith("step/")}
        missing = sorted(set(moments) - set(partition))
        if missing:
            raise ConfigError(
                f"{kind} checkpoint {str(folder)!r} lacks {missing[:8]}{'...' if len(missing) > 8 else ''}"
            )
        for name, stored in moments.items():
            piece = local_piece(read_local_tensor(paths, name, partition[name], tp_rank, tp_size), stored)
            if piece.shape != stored.local.shape:
                raise ConfigError(
                    f"{kind} tensor {name!r} of {str(path)!r} gives shape {tuple(piece.shape)} here; "
                    f"this model holds {tuple(stored.local.shape)}"
                )
            with torch.no_grad():
                stored.local.copy_(piece.to(stored.local.dtype))
        steps = {name: value for name, value in targets.items() if name.startswith("step/")}
        if steps:
            verify_file(folder / "scalars.json")
            scalars = json.loads((folder / "scalars.json").read_text())
            for name, count in steps.items():
                count.fill_(scalars[name])
