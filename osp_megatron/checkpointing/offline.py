"""Checkpoints read in one plain process, tensor by tensor, whatever their format and the layout that wrote them.

Used by osp-ckpt (inspect, export, average, reshard) and by tests that compare checkpoints.
"""

import json
from pathlib import Path
from typing import Iterator

import torch

from osp_megatron.checkpointing.distributed import iter_tensors, stored_index
from osp_megatron.checkpointing.metadata import STATE, is_distributed_format, read_metadata
from osp_megatron.checkpointing.sharded import iter_full_tensors, source_layout

KINDS = ("model", "ema", "optimizer")


def stored_shapes(path: str | Path, which: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (full shape, dtype) of one kind of tensors (model, ema or optimizer), from file headers only."""
    path = Path(path)
    metadata = read_metadata(path)
    if is_distributed_format(metadata):
        prefix = which + "/"
        return {key[len(prefix):]: (tuple(meta.size), meta.properties.dtype)
                for key, meta in stored_index(path / STATE).items() if key.startswith(prefix)}
    from safetensors import safe_open

    if not (path / which).is_dir():
        return {}
    tp_size, paths, partition = source_layout(path / which)
    found = {}
    with safe_open(str(paths[0]), framework="pt") as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            shape, dim = list(piece.get_shape()), partition.get(name)
            if dim is not None:
                shape[dim] *= tp_size
            found[name] = (tuple(shape), _SAFETENSORS_DTYPES[piece.get_dtype()])
    return found


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32}


def stored_kinds(path: str | Path) -> list[str]:
    """The kinds of tensors (model, ema, optimizer) a checkpoint holds, in that order."""
    return [which for which in KINDS if stored_shapes(path, which)]


def iter_checkpoint_tensors(path: str | Path, which: str = "model") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of a checkpoint's model, ema or optimizer tensors, one at a time, sorted by name.

    Optimizer names are '<moment>/<parameter>' (exp_avg, exp_avg_sq, and step for the step counts)."""
    path = Path(path)
    metadata = read_metadata(path)
    if is_distributed_format(metadata):
        yield from iter_tensors(path / STATE, which)
        return
    yield from iter_full_tensors(path / which)
    scalars = path / which / "scalars.json"
    if which == "optimizer" and scalars.is_file():
        for name, value in sorted(json.loads(scalars.read_text()).items()):
            yield name, torch.tensor(value, dtype=torch.float32)


def read_checkpoint_tensors(path: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of one kind at once (small models and tests; use iter_checkpoint_tensors for large ones)."""
    return dict(iter_checkpoint_tensors(path, which))
