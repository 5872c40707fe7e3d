"""Export of this framework's checkpoints to diffusers' or Wan2.1's own safetensors layout, and their description.

Tensors are assembled whole from whatever layout wrote them, one at a time, so exporting never holds more than
one file's worth.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from osp_megatron.checkpointing.metadata import METADATA, describe_layout, is_complete, read_metadata, saved_layout
from osp_megatron.checkpointing.offline import KINDS, iter_checkpoint_tensors, stored_shapes
from osp_megatron.checkpointing.wan_config import (
    diffusers_config,
    fields_from_shapes,
    make_model_config,
    original_config,
)
from osp_megatron.checkpointing.wan_convert import (
    DTYPES,
    EXPECTED_LAYOUTS,
    describe_config,
    open_source,
    prepare_output,
    publish_output,
    shorten_list,
    silent,
)
from osp_megatron.checkpointing.wan_keys import DIFFUSERS, ORIGINAL, OURS, parameter_layout, rename
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import ModelConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def checkpoint_model_config(
    path: str | Path, overrides: dict | None = None, metadata: dict | None = None
) -> ModelConfig:
    """The ModelConfig of a framework checkpoint: its metadata's model_config (or the training config's model
    section), else read off the stored shapes; `overrides` (ModelConfig fields) win."""
    path = Path(path)
    metadata = read_metadata(path) if metadata is None else metadata
    stored = metadata.get("model_config") or (metadata.get("config") or {}).get("model")
    if stored is not None:
        data = dict(stored)
        data.update(overrides or {})
        return from_dict(ModelConfig, data, "model")
    shapes = {name: shape for name, (shape, _) in stored_shapes(path, "model").items()}
    return make_model_config(fields_from_shapes(shapes), overrides, source=str(path / METADATA))


# Export formats: the parameter names each uses, and its config.json.
EXPORT_FORMATS = {"diffusers": DIFFUSERS, "original": ORIGINAL}


def export_diffusers(
    checkpoint: str | Path,
    output: str | Path,
    which: str = "model",
    dtype: str | None = None,
    max_shard_bytes: int = 10 * 2**30,
    overwrite: bool = False,
    log: Callable[[str], None] = silent,
    format: str = "diffusers",
) -> Path:
    """Write a framework checkpoint's model or EMA weights as one consolidated set of safetensors files.

    format "diffusers": a WanTransformer3DModel folder (diffusers names and config); "original": Wan2.1's own
    parameter names and config.json, as the Wan2.1 and OSP-Next repositories load them. Both load back with
    checkpoint.load and osp-sample. Tensors are written in files of at most `max_shard_bytes` (several files
    get an index).
    """
    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint)
    config = checkpoint_model_config(checkpoint, metadata=metadata)
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    names = EXPORT_FORMATS[format]
    stored = stored_shapes(checkpoint, which)
    if not stored:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} has no {which!r} weights")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    expected = parameter_layout(config)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{which} weights in {str(checkpoint)!r} do not match their model_config "
            f"({describe_config(config)}): missing {shorten_list(missing)}, "
            f"unexpected {shorten_list(unexpected)}"
        )
    if config.sparse_ratio > 1:
        log(
            f"note: this model was trained with Skiparse attention (sparse_ratio={config.sparse_ratio}); {format} "
            "code runs full attention in every block, so its outputs differ from this framework's"
        )

    output = Path(output)
    tmp = prepare_output(output, overwrite)
    files, current, size = [], {}, 0
    for name, tensor in iter_checkpoint_tensors(checkpoint, which):
        if tuple(tensor.shape) != expected[name].shape:
            raise ConfigError(
                f"{which} tensor {name!r} of {str(checkpoint)!r} has shape {tuple(tensor.shape)} but "
                f"model_config needs {expected[name].shape}"
            )
        if dtype is not None:
            tensor = tensor.to(DTYPES[dtype])
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            files.append(_write_part(tmp, len(files), current))
            current, size = {}, 0
        current[rename(name, OURS, names)] = tensor.contiguous()
        size += nbytes
    files.append(_write_part(tmp, len(files), current))
    _name_parts(tmp, files)
    (tmp / "config.json").write_text(json.dumps(_exported_config(config, format), indent=2))
    publish_output(tmp, output)
    log(
        f"exported {which} weights of {checkpoint} ({describe_config(config)}) to {output} "
        f"in {len(files)} file(s), {format} layout"
    )
    return output


def _exported_config(config: ModelConfig, format: str) -> dict:
    if format == "original":
        return original_config(config)
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = "0.33.0"
    return diffusers_config(config, version)


def _write_part(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> tuple[Path, dict[str, int]]:
    path = folder / f"part-{index:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, {name: t.numel() * t.element_size() for name, t in tensors.items()}


def _name_parts(folder: Path, parts: list[tuple[Path, dict[str, int]]]) -> None:
    """Give the written files diffusers' names: one file, or numbered shards plus an index."""
    if len(parts) == 1:
        os.replace(parts[0][0], folder / f"{DIFFUSERS_WEIGHTS}.safetensors")
        return
    weight_map, total = {}, 0
    for number, (path, sizes) in enumerate(parts, start=1):
        name = f"{DIFFUSERS_WEIGHTS}-{number:05d}-of-{len(parts):05d}.safetensors"
        os.replace(path, folder / name)
        weight_map.update({tensor: name for tensor in sizes})
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{DIFFUSERS_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def describe(path: Path, overrides: dict | None = None, tensors: bool = False) -> list[str]:
    """Human-readable summary of a framework checkpoint (format, step, layout that wrote it, model config,
    what it holds; with `tensors` every tensor's shape and dtype) or of a published Wan2.1 checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; {EXPECTED_LAYOUTS}")
    if not is_complete(path):
        weights = open_source(path, overrides)
        count = sum(torch.Size(weights.expected[name].shape).numel() for name in weights.pieces)
        return [
            f"{path}: {weights.layout} layout ({weights.files.description})",
            f"config: {describe_config(weights.model_config)}",
            f"parameters: {count:,} in {len(weights.pieces)} tensors",
            f"missing ({len(weights.missing)}): {shorten_list(weights.missing)}",
            f"unexpected ({len(weights.unexpected)}): {shorten_list(weights.unexpected)}",
        ]
    metadata = read_metadata(path)
    lines = [
        f"{path}: {metadata.get('format', 'unknown format')}",
        f"step: {metadata.get('step')}",
        f"written under: {describe_layout(saved_layout(metadata))}",
    ]
    for key, what in (
        ("imported_from", "imported from"),
        ("averaged_from", "average of"),
        ("resharded_from", "resharded from"),
    ):
        if key in metadata:
            lines.append(f"{what}: {metadata[key]}")
    try:
        config = checkpoint_model_config(path, overrides, metadata=metadata)
        lines.append(f"config: {describe_config(config)}, sparse_ratio={config.sparse_ratio}")
    except ConfigError as err:
        lines.append(f"config: unknown ({err})")
    for which in KINDS:
        shapes = stored_shapes(path, which)
        if not shapes:
            continue
        count = sum(torch.Size(shape).numel() for shape, _ in shapes.values())
        dtypes = sorted({str(dtype).replace("torch.", "") for _, dtype in shapes.values()})
        lines.append(f"{which}: {count:,} values in {len(shapes)} tensors, dtype {'/'.join(dtypes)}")
        if tensors:
            lines.extend(
                f"  {name}  {list(shape)}  {str(dtype).replace('torch.', '')}"
                for name, (shape, dtype) in sorted(shapes.items())
            )
    return lines
