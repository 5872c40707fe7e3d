"""A LoRA checkpoint folded into its base: a plain weights-only checkpoint, written one tensor at a time.

Behind `osp-ckpt merge-lora` and the run.dir/merged folder of a LoRA job; the base is found and checked through
the checkpoint's reference (checkpointing/base_weights.py). Memory holds one tensor, never the whole model.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from osp_megatron.checkpointing.base_weights import BaseWeights, lora_metadata, merged_tensor, resolve_base
from osp_megatron.checkpointing.metadata import is_complete, read_metadata
from osp_megatron.checkpointing.offline import read_checkpoint_tensor, stored_shapes
from osp_megatron.checkpointing.transforms import write_weights_checkpoint
from osp_megatron.checkpointing.wan_convert import silent
from osp_megatron.config.errors import ConfigError

ADAPTER_A, ADAPTER_B = ".lora_A.default.weight", ".lora_B.default.weight"


def _base_reader(base: BaseWeights) -> tuple[dict[str, tuple[tuple, torch.dtype]], Callable[[str], torch.Tensor]]:
    """(name -> (shape, dtype), read(name)) of the plain DiT weights at the base."""
    if is_complete(Path(base.path)):
        shapes = stored_shapes(base.path, base.which)
        return shapes, lambda name: read_checkpoint_tensor(base.path, base.which, name)
    from osp_megatron.checkpointing.wan_convert import open_source

    source = open_source(base.path)
    shapes = {
        name: (tuple(info.shape), source.files.get(source.prefix + source.pieces[name].source).dtype)
        for name, info in source.expected.items()
        if name in source.pieces
    }
    return shapes, source.tensor


def adapted_linears(adapter_shapes: dict) -> list[str]:
    """Names (prefixes) of the linears a LoRA checkpoint adapts, from its stored adapter tensor names."""
    return sorted(name[: -len(ADAPTER_A)] for name in adapter_shapes if name.endswith(ADAPTER_A))


def merge_lora_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    base: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = silent,
) -> Path:
    """Write base + scaling B A of every adapted linear of a LoRA checkpoint to `output` (model weights from
    its raw adapters, EMA weights from its EMA adapters when it has them). `base`: where the base weights are
    now, when they moved (checked against the checkpoint's fingerprint)."""
    checkpoint = Path(checkpoint)
    info = lora_metadata(checkpoint)
    if info is None:
        raise ConfigError(f"{str(checkpoint)!r} is not a LoRA checkpoint (its metadata names no adapters)")
    reference = resolve_base(checkpoint, base)
    scaling = info["lora"]["alpha"] / info["lora"]["rank"]
    shapes, read_base = _base_reader(reference)
    kinds = [kind for kind in ("model", "ema") if stored_shapes(checkpoint, kind)]
    adapters = {kind: stored_shapes(checkpoint, kind) for kind in kinds}
    linears = {kind: adapted_linears(adapters[kind]) for kind in kinds}
    for kind in kinds:
        unknown = [name for name in linears[kind] if f"{name}.weight" not in shapes]
        if unknown:
            raise ConfigError(
                f"LoRA checkpoint {str(checkpoint)!r} adapts linears its base does not have: {unknown[:8]}"
            )
    specs = {f"{kind}/{name}": (shape, dtype or stored) for kind in kinds for name, (shape, stored) in shapes.items()}
    adapter_of = {kind: {f"{name}.weight": name for name in linears[kind]} for kind in kinds}

    def produce(key: str) -> torch.Tensor:
        kind, name = key.split("/", 1)
        tensor = read_base(name)
        linear = adapter_of[kind].get(name)
        if linear is not None:
            tensor = merged_tensor(
                tensor,
                read_checkpoint_tensor(checkpoint, kind, linear + ADAPTER_A),
                read_checkpoint_tensor(checkpoint, kind, linear + ADAPTER_B),
                scaling,
            )
        return tensor.to(specs[key][1])

    metadata = read_metadata(checkpoint)
    kept = {
        "step": int(metadata.get("step", 0)),
        "model_config": metadata.get("model_config"),
        "merged_from": {"lora": str(checkpoint), "base": reference.path},
    }
    if metadata.get("config"):
        config = dict(metadata["config"])
        config.pop("lora", None)
        kept["config"] = config
    write_weights_checkpoint(Path(output), specs, produce, kept, overwrite)
    log(f"merged {len(linears[kinds[0]])} adapted linears of {checkpoint} into {reference.path}'s weights: {output}")
    return Path(output)
