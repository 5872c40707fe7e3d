"""osp_megatron.models package."""
