"""What makes a folder a checkpoint of this framework: its metadata file, format tag and completeness.

Kept free of megatron-core so offline tools (osp-ckpt) start fast.
"""

import json
from pathlib import Path

from osp_megatron.config.errors import ConfigError

FORMAT = "osp-megatron-checkpoint/1"
METADATA = "metadata.json"


def is_complete(path: Path) -> bool:
    """A checkpoint is complete once its metadata file exists: it is written last."""
    return (Path(path) / METADATA).is_file()


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"{str(path)!r} is not a complete checkpoint (no {METADATA}); an interrupted save "
                          "leaves a '.tmp' folder that is never loaded")
    return json.loads((path / METADATA).read_text())
