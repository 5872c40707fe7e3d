"""The DiT, its configuration and presets, construction for a parallel layout, and loading published weights.

`load_pretrained` is imported on first use, so reading a ModelConfig does not pull in megatron-core.
"""

__all__ = ["load_pretrained"]


def __getattr__(name):
    if name == "load_pretrained":
        from osp_megatron.models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'osp_megatron.models' has no attribute {name!r}")
