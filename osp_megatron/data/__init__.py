"""Training data: pre-encoded (latent video, text state) samples in webdataset shards.

Typed config, a learnable synthetic data set, and a deterministic, resumable, data-parallel loader.
"""

from osp_megatron.utils.lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "config",
    "WebDatasetLoader": "loader",
    "build_data_loader": "loader",
    "ShardInfo": "shards",
    "resolve_shards": "shards",
    "write_synthetic_shards": "synthetic",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
