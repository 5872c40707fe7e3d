"""What makes a folder a checkpoint of this framework: its metadata file, format tag and completeness.

Kept free of megatron-core so offline tools (osp-ckpt) start fast.
"""

import json
from pathlib import Path

from osp_megatron.config.errors import ConfigError

# Format 1: tensor-parallel safetensors (checkpointing/sharded.py); format 2: torch.distributed.checkpoint
# pieces with global shapes (checkpointing/distributed.py), readable under any parallel layout.
FORMAT = "osp-megatron-checkpoint/1"
DISTRIBUTED_FORMAT = "osp-megatron-checkpoint/2"
METADATA = "metadata.json"
STATE = "state"  # a format-2 checkpoint's torch.distributed.checkpoint folder


def is_complete(path: Path) -> bool:
    """A checkpoint is complete once its metadata file exists: it is written last."""
    return (Path(path) / METADATA).is_file()


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    if not is_complete(path):
        raise ConfigError(
            f"{str(path)!r} is not a complete checkpoint (no {METADATA}); an interrupted save "
            "leaves a '.tmp' folder that is never loaded"
        )
    return json.loads((path / METADATA).read_text())


def is_distributed_format(metadata: dict) -> bool:
    return metadata.get("format") == DISTRIBUTED_FORMAT


LAYOUT_KEYS = ("world_size", "tensor", "data", "ssp", "ulysses", "fsdp")


def current_layout(fsdp: bool = False) -> dict:
    """The parallel layout of this run, as recorded in checkpoints and compared on resume."""
    import torch.distributed as dist

    from osp_megatron.parallel import state

    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "world_size": world,
        "tensor": state.tensor_parallel_size(),
        "data": state.data_parallel_size(),
        "ssp": state.ssp_size(),
        "ulysses": state.ulysses_size(),
        "fsdp": bool(fsdp),
    }


def saved_layout(metadata: dict) -> dict:
    """The layout a checkpoint was written under (checkpoints from before layouts were recorded: inferred)."""
    if "layout" in metadata:
        return {"fsdp": False, **metadata["layout"]}
    world, tensor = int(metadata.get("world_size", 1)), int(metadata.get("tensor_parallel", 1))
    return {"world_size": world, "tensor": tensor, "data": world // tensor, "ssp": 1, "ulysses": 1, "fsdp": False}


def describe_layout(layout: dict) -> str:
    return (
        f"tensor={layout['tensor']} data={layout['data']} ssp={layout['ssp']} ulysses={layout['ulysses']} "
        f"fsdp={str(bool(layout.get('fsdp'))).lower()} (world size {layout['world_size']})"
    )


def same_layout(metadata: dict, fsdp: bool = False) -> bool:
    return saved_layout(metadata) == current_layout(fsdp)
