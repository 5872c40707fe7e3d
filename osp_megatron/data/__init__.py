"""Training data: pre-encoded (latent video, text state) samples in webdataset shards.

Typed config, a learnable synthetic data set, and a deterministic, resumable, data-parallel loader.
"""

from osp_megatron.data.config import DataConfig
from osp_megatron.data.loader import WebDatasetLoader, build_data_loader
from osp_megatron.data.shards import ShardInfo, resolve_shards
from osp_megatron.data.synthetic import ensure_synthetic_data, make_synthetic_shards

__all__ = ["DataConfig", "ShardInfo", "WebDatasetLoader", "build_data_loader", "ensure_synthetic_data",
           "make_synthetic_shards", "resolve_shards"]
