"""The Wan2.1 DiT family (dense and hybrid full/Skiparse attention) built on megatron-core."""

from osp_megatron.models.wan.model import WanDiT, build_transformer_config

__all__ = ["WanDiT", "build_transformer_config"]
