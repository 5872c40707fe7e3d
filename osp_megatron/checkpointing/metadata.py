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
    if not is_complete(path):
        raise ConfigError(f"{str(path)!r} is not a complete checkpoint (no {METADATA}); an interrupted save "
                          "leaves a '.tmp' folder that is never loaded")
    return json.loads((path / METADATA).read_text())


def is_distributed_format(metadata: dict) -> bool:
    return metadata.get("format") == DISTRIBUTED_FORMAT
