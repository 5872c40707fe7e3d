"""Offline checkpoint transforms behind osp-ckpt: average several checkpoints, and write a weights-only checkpoint
from any source of whole tensors, streaming one tensor at a time.

Resharding, which runs the jobs' own model building, load and save, lives in osp_megatron.engine.reshard.
"""

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from osp_megatron.checkpointing.integrity import write_manifest
from osp_megatron.checkpointing.metadata import DISTRIBUTED_FORMAT, METADATA, STATE, read_metadata
from osp_megatron.checkpointing.offline import (
    read_checkpoint_tensor,
    stored_kinds,
    stored_shapes,
    write_tensors_streaming,
)
from osp_megatron.checkpointing.wan_convert import DTYPES, prepare_output, publish_output, silent
from osp_megatron.config.errors import ConfigError

ONE_RANK = {"world_size": 1, "tensor": 1, "data": 1, "ssp": 1, "ulysses": 1, "fsdp": False}


def write_weights_checkpoint(
    output: Path,
    specs: dict[str, tuple[tuple, torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict,
    overwrite: bool = False,
) -> Path:
    """A complete checkpoint (state/, manifest, metadata.json) of whole tensors `specs` ('model/<name>' or
    'ema/<name>' -> (shape, dtype)), produced one at a time; it appears under `output` only once complete."""
    output = Path(output)
    tmp = prepare_output(output, overwrite)
    write_tensors_streaming(tmp / STATE, specs, produce)
    write_manifest(tmp)
    info = {
        "format": DISTRIBUTED_FORMAT,
        "step": 0,
        "layout": ONE_RANK,
        "tensor_parallel": 1,
        "world_size": 1,
        "saved_at": time.time(),
        **metadata,
    }
    (tmp / METADATA).write_text(json.dumps(info, indent=2, default=str))
    publish_output(tmp, output)
    return output


def average_checkpoints(
    paths: Iterable[str | Path],
    output: str | Path,
    kinds: tuple = ("model", "ema"),
    dtype: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = silent,
) -> Path:
    """The element-wise mean of the model (and EMA) weights of several checkpoints of one model, as a
    weights-only checkpoint (step: the newest input's). Means are taken in float64, one tensor at a time."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError("average needs at least two checkpoints")
    metadata = [read_metadata(path) for path in paths]
    first = paths[0]
    kinds = tuple(kind for kind in kinds if all(kind in stored_kinds(path) for path in paths))
    if "model" not in kinds:
        raise ConfigError("every checkpoint to average must hold model weights")
    specs = {}
    for kind in kinds:
        shapes = stored_shapes(first, kind)
        for path in paths[1:]:
            other = stored_shapes(path, kind)
            if {k: v[0] for k, v in other.items()} != {k: v[0] for k, v in shapes.items()}:
                raise ConfigError(
                    f"{path} and {first} hold different {kind} tensors (another model?); only "
                    "checkpoints of one model can be averaged"
                )
        for name, (shape, stored_dtype) in shapes.items():
            specs[f"{kind}/{name}"] = (shape, DTYPES[dtype] if dtype else stored_dtype)

    def mean(key: str) -> torch.Tensor:
        kind, name = key.split("/", 1)
        total = sum(read_checkpoint_tensor(path, kind, name).double() for path in paths)
        return (total / len(paths)).to(specs[key][1])

    newest = max(int(m.get("step", 0)) for m in metadata)
    info = {
        "step": newest,
        "averaged_from": [str(p) for p in paths],
        "model_config": metadata[0].get("model_config") or (metadata[0].get("config") or {}).get("model"),
    }
    write_weights_checkpoint(Path(output), specs, mean, info, overwrite)
    log(f"averaged {', '.join(kinds)} weights of {len(paths)} checkpoints into {output} (step {newest})")
    return Path(output)
