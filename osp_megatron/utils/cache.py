"""Where osp_megatron keeps files it derives once per machine (the tiny fitted VAE): $OSP_MEGATRON_CACHE.

Light on imports, so tests and command lines can point it elsewhere before anything heavy loads.
"""

import os
from pathlib import Path

CACHE_ENV = "OSP_MEGATRON_CACHE"


def cache_root() -> Path:
    """$OSP_MEGATRON_CACHE when set, else ~/.cache/osp_megatron."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "osp_megatron")
