"""The Wan2.1 DiT with real weights in one call: from a framework checkpoint, a diffusers folder or original weights.

Works in a plain Python process (it sets up a one-rank process group) and inside a tensor-parallel job alike.
"""

from pathlib import Path

import torch
from megatron.core import parallel_state

from osp_megatron.checkpointing.checkpoint import is_complete, load_model_weights
from osp_megatron.checkpointing.wan_convert import (
    DTYPES,
    EXPECTED_LAYOUTS,
    WeightSource,
    open_source,
)
from osp_megatron.checkpointing.wan_export import checkpoint_model_config
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import to_dict
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.models.wan.model import WanDiT
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import copy_slice_into


def _dtype_name(dtype) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ConfigError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16' (or the torch dtypes)")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"pretrained weights {str(path)!r} do not exist; {EXPECTED_LAYOUTS}")
    return path


def pretrained_model_config(path: str | Path, **overrides) -> ModelConfig:
    """The ModelConfig that `load_pretrained(path, **overrides)` builds, without loading any weight."""
    path = _existing(path)
    if is_complete(path):
        return checkpoint_model_config(path, overrides)
    return open_source(path, overrides).model_config


def load_pretrained(
    path: str | Path,
    *,
    dtype=None,
    device: str | torch.device = "cpu",
    which: str = "model",
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    **overrides,
) -> WanDiT:
    """The DiT holding the weights at `path`, split for the current tensor-parallel size.

    `path`: an osp_megatron checkpoint (its metadata's model_config describes the model), a diffusers
    WanTransformer3DModel folder or pipeline folder, or an original Wan2.1 / OSP-Next checkpoint file or folder.
    `overrides`: ModelConfig fields, e.g. sparse_ratio=2 to run full-attention weights with Skiparse blocks
    (the parameters are the same) or attention_backend="math". `dtype`: "float32" (the default, what training
    keeps as master weights) or "bfloat16" (an inference copy: every parameter in bf16). `which="ema"` takes a
    framework checkpoint's EMA weights.
    """
    path = _existing(path)
    if dtype is not None:
        overrides["params_dtype"] = _dtype_name(dtype)
    if not parallel_state.model_parallel_is_initialized():
        state.ensure_single_rank_group()
    if is_complete(path):
        config, source = checkpoint_model_config(path, overrides), None
    else:
        if which != "model":
            raise ConfigError(f"which={which!r}: published checkpoints hold one set of weights; use which='model'")
        source = open_source(path, overrides)
        config = source.model_config
    # Every weight is overwritten below, so none is initialised first (for 14B that saves minutes of CPU
    # work); only when weights may be missing do they start from the normal initialisation.
    model = build_model(config, device, initialize=allow_missing)
    # Modules outside megatron-core's layers (embeddings, norms, modulation tables) are created in float32.
    model.to(DTYPES[config.params_dtype])
    if source is None:
        missing, unexpected = load_model_weights(path, model, which=which, strict=False)
        _check(f"{which} weights of {str(path)!r}", missing, unexpected, allow_missing, allow_unexpected)
    else:
        load_source_into(source, model, allow_missing, allow_unexpected)
    return model


def load_pretrained_weights(
    model: torch.nn.Module,
    path: str | Path,
    which: str = "model",
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    names: dict[str, str] | None = None,
) -> None:
    """Copy the weights at `path` (any layout `load_pretrained` reads) into an already built model, sharded or
    not; `names` maps the model's parameter names to the plain DiT's (default: all, unchanged; a LoRA model
    passes its base weights)."""
    path = _existing(path)
    if is_complete(path):
        missing, unexpected = load_model_weights(path, model, which=which, strict=False, names=names)
        _check(f"{which} weights of {str(path)!r}", missing, unexpected, allow_missing, allow_unexpected)
        return
    # The model's own config decides the expected shapes, so a mismatch is reported tensor by tensor.
    source = open_source(path, to_dict(model.model_config))
    load_source_into(source, model, allow_missing, allow_unexpected, names)


def _check(what: str, missing: list[str], unexpected: list[str], allow_missing: bool, allow_unexpected: bool):
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}")
    if unexpected and not allow_unexpected:
        problems.append(f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    if problems:
        raise ConfigError(f"{what} do not match the model: " + "; ".join(problems))


def load_source_into(
    source: WeightSource,
    model: torch.nn.Module,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    names: dict[str, str] | None = None,
) -> None:
    """Copy a published checkpoint into `model`, keeping this tensor-parallel rank's slice of each tensor (and of
    that, this rank's FSDP shard); `names` as in load_pretrained_weights."""
    source.check_keys(allow_missing, allow_unexpected)
    rank, size = state.tensor_parallel_rank(), state.tensor_parallel_size()
    params = dict(model.named_parameters())
    names = names if names is not None else {name: name for name in params}
    strangers = sorted(set(names.values()) - set(source.expected))
    if strangers:
        raise ConfigError(f"the model has parameters the Wan key map does not know: {strangers[:10]}")
    for name, plain in names.items():
        if plain not in source.pieces:
            continue
        param = params[name]
        full = source.tensor(plain)
        dim = source.expected[plain].partition_dim
        local = full if dim is None else full.chunk(size, dim=dim)[rank]
        if local.shape != param.shape:
            raise ConfigError(
                f"{plain!r}: {source.layout} checkpoint {str(source.path)!r} gives shape "
                f"{tuple(local.shape)} on tensor-parallel rank {rank} of {size}, the model holds "
                f"{tuple(param.shape)}"
            )
        copy_slice_into(param, local)
