"""Import of published Wan2.1 DiT weights (original Wan or diffusers layout) into this framework's checkpoints.

Works one tensor at a time in a plain process: each tensor is split for every tensor-parallel rank on the fly.
"""

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from osp_megatron.checkpointing.metadata import FORMAT, METADATA, is_complete
from osp_megatron.checkpointing.sharded import save_shard
from osp_megatron.checkpointing.wan_config import (
    config_kind,
    fields_from_diffusers,
    fields_from_original,
    fields_from_shapes,
    make_model_config,
)
from osp_megatron.checkpointing.wan_keys import (
    ANCHOR,
    OURS,
    ParameterInfo,
    Piece,
    detect_layout,
    find_prefix,
    parameter_layout,
    plan_sources,
    rename,
)
from osp_megatron.checkpointing.weight_files import TensorFiles, find_weight_file, open_weights
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import to_dict
from osp_megatron.models.config import PARAMS_DTYPES, ModelConfig, torch_dtype

DTYPES = {name: torch_dtype(name) for name in PARAMS_DTYPES}

EXPECTED_LAYOUTS = (
    "expected a diffusers WanTransformer3DModel folder (config.json + diffusion_pytorch_model*.safetensors, or "
    "the pipeline folder holding it in transformer/), an original Wan2.1 / OSP-Next checkpoint (.pth/.pt, "
    ".safetensors, or sharded *.safetensors with their *.safetensors.index.json), or an osp_megatron checkpoint "
    "folder (metadata.json + model/tpRR-of-NN.safetensors)"
)


def silent(_: str) -> None:
    """The default progress log: say nothing."""


@dataclass
class WeightSource:
    """A published Wan2.1 DiT checkpoint, readable tensor by tensor under our parameter names."""

    path: Path
    layout: str
    files: TensorFiles
    prefix: str
    model_config: ModelConfig
    expected: dict[str, ParameterInfo]
    pieces: dict[str, Piece]
    missing: list[str]
    unexpected: list[str]

    def tensor(self, name: str) -> torch.Tensor:
        """Our parameter `name` at full size, as stored (dtype unchanged); shape-checked."""
        piece = self.pieces[name]
        stored = self.prefix + piece.source
        value = self.files.get(stored)
        if piece.parts > 1:
            if value.shape[0] % piece.parts:
                raise ConfigError(
                    f"fused tensor {stored!r} in {self.files.file_of(stored)!r} has {value.shape[0]} "
                    f"rows, not divisible into {piece.parts} projections"
                )
            value = value.chunk(piece.parts, dim=0)[piece.index]
        expected = self.expected[name].shape
        if tuple(value.shape) != expected:
            raise ConfigError(
                f"tensor {stored!r} in {self.files.file_of(stored)!r} has shape {tuple(value.shape)}, "
                f"but a model with {describe_config(self.model_config)} needs {expected} for {name!r}"
            )
        return value

    def check_keys(self, allow_missing: bool = False, allow_unexpected: bool = False) -> None:
        problems = []
        if self.missing and not allow_missing:
            problems.append(
                f"missing {len(self.missing)} parameters {shorten_list(self.missing)} "
                "(allow with --allow-missing, or allow_missing=True: they keep their fresh initialisation)"
            )
        if self.unexpected and not allow_unexpected:
            problems.append(
                f"{len(self.unexpected)} unexpected tensors {shorten_list(self.unexpected)} "
                "(allow with --allow-unexpected, or allow_unexpected=True: they are dropped)"
            )
        if problems:
            raise ConfigError(
                f"{self.layout} checkpoint {str(self.path)!r} does not match the model: " + "; ".join(problems)
            )


def shorten_list(names: list[str], limit: int = 8) -> str:
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")


def describe_config(config: ModelConfig) -> str:
    return (
        f"dim={config.dim}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
        f"ffn_dim={config.ffn_dim}, patch_size={list(config.patch_size)}, text_dim={config.text_dim}"
    )


def open_source(path: str | Path, overrides: dict | None = None, state_key: str | None = None) -> WeightSource:
    """Open an original-layout or diffusers-layout Wan2.1 DiT checkpoint and plan its conversion.

    The model's dimensions come from the config.json beside the weights, else from the weight shapes;
    `overrides` (ModelConfig fields, e.g. sparse_ratio=2 or num_heads) take precedence over both.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; {EXPECTED_LAYOUTS}")
    if is_complete(path):
        raise ConfigError(f"{str(path)!r} is already an osp_megatron checkpoint (it has {METADATA})")
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
            path = path / "transformer"
        weight_file, config_dir = find_weight_file(path), path
    else:
        weight_file, config_dir = path, path.parent
    files = open_weights(weight_file, state_key)
    return _plan(path, files, config_dir, overrides or {})


def _plan(path: Path, files: TensorFiles, config_dir: Path, overrides: dict) -> WeightSource:
    keys = files.keys()
    prefix = find_prefix(keys)
    if prefix is None:
        raise ConfigError(
            f"{files.description!r} has no tensor named '{ANCHOR}', so it is no Wan2.1 DiT; {EXPECTED_LAYOUTS}"
        )
    names = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
    layout = detect_layout(names)
    if layout is None:
        raise ConfigError(
            f"{files.description!r}: parameter names follow neither Wan's original layout nor "
            f"diffusers'; {EXPECTED_LAYOUTS}"
        )
    config_file = config_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kind = config_kind(config)
    if kind == "diffusers":
        fields = fields_from_diffusers(config, str(config_file))
    elif kind == "original":
        fields = fields_from_original(config, str(config_file))
    else:
        shapes = {}
        for name in names:
            ours = rename(name, layout, OURS)
            if ours is not None:
                shapes[ours] = files.shape(prefix + name)
        fields = fields_from_shapes(shapes)
    source = str(config_file) if kind else files.description
    model_config = make_model_config(fields, overrides, source=source)
    expected = parameter_layout(model_config)
    pieces, missing, unexpected = plan_sources(expected, names, layout)
    unexpected += [key for key in keys if not key.startswith(prefix)]
    return WeightSource(path, layout, files, prefix, model_config, expected, pieces, missing, unexpected)


@dataclass
class ImportSummary:
    output: Path
    source_layout: str
    model_config: ModelConfig
    tensor_parallel: int
    dtype: str
    parameters: int
    tensors: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def check_tensor_parallel(config: ModelConfig, tensor_parallel: int) -> None:
    """megatron-core splits heads, the FFN width and the q/k norms evenly; refuse sizes that do not divide."""
    if tensor_parallel < 1:
        raise ConfigError(f"tensor-parallel size must be >= 1, got {tensor_parallel}")
    for name in ("num_heads", "ffn_dim"):
        if getattr(config, name) % tensor_parallel:
            raise ConfigError(
                f"model.{name}={getattr(config, name)} is not divisible by tensor-parallel size {tensor_parallel}"
            )


def prepare_output(output: Path, overwrite: bool) -> Path:
    """A fresh `OUTPUT.tmp` folder to write into; `publish_output` moves it into place once complete."""
    if output.exists() and not overwrite:
        raise ConfigError(f"output {str(output)!r} already exists; pass --overwrite to replace it")
    tmp = output.with_name(output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_output(tmp: Path, output: Path) -> None:
    """Replace `output` by the finished `tmp` folder; a failed conversion leaves an existing output intact."""
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(tmp, output)


def import_checkpoint(
    source: str | Path,
    output: str | Path,
    tensor_parallel: int = 1,
    dtype: str = "float32",
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    overrides: dict | None = None,
    state_key: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = silent,
) -> ImportSummary:
    """Write an osp_megatron checkpoint (step 0, weights only) at `tensor_parallel` shards from a Wan2.1 DiT.

    Each shard is assembled one tensor at a time: read a tensor, keep this rank's slice, drop the rest. The
    folder appears under its final name only once complete.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    weights = open_source(source, overrides, state_key)
    config = weights.model_config
    log(f"source: {weights.layout} layout, {weights.files.description}")
    log(f"model: {describe_config(config)}, sparse_ratio={config.sparse_ratio}")
    for label, names in (("missing", weights.missing), ("unexpected", weights.unexpected)):
        if names:
            log(f"{label} ({len(names)}): {shorten_list(names, 20)}")
    weights.check_keys(allow_missing, allow_unexpected)
    check_tensor_parallel(config, tensor_parallel)

    output = Path(output)
    tmp = prepare_output(output, overwrite)
    target_dtype = DTYPES[dtype]
    present = [name for name in weights.expected if name in weights.pieces]
    parameters = sum(torch.Size(weights.expected[name].shape).numel() for name in present)
    for rank in range(tensor_parallel):
        shard, partition = {}, {}
        for name in present:
            dim = weights.expected[name].partition_dim
            full = weights.tensor(name).to(target_dtype)
            shard[name] = full if dim is None else full.chunk(tensor_parallel, dim=dim)[rank].clone()
            partition[name] = dim
            del full
        save_shard(tmp / "model", shard, partition, rank, tensor_parallel)
        log(f"wrote tensor-parallel shard {rank + 1}/{tensor_parallel}")
        del shard
    metadata = {
        "format": FORMAT,
        "step": 0,
        "tensor_parallel": tensor_parallel,
        "world_size": tensor_parallel,
        "saved_at": time.time(),
        "model_config": to_dict(config),
        "dtype": dtype,
        "imported_from": {
            "path": str(weights.path),
            "layout": weights.layout,
            "missing": weights.missing,
            "unexpected": weights.unexpected,
        },
    }
    (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
    publish_output(tmp, output)
    log(
        f"imported {parameters:,} parameters ({len(present)} tensors) as {dtype} into {output} "
        f"(tensor parallel {tensor_parallel})"
    )
    return ImportSummary(
        output,
        weights.layout,
        config,
        tensor_parallel,
        dtype,
        parameters,
        len(present),
        weights.missing,
        weights.unexpected,
    )
