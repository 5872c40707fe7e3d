"""osp_megatron.utils package."""
