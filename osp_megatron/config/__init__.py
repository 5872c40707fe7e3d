"""osp_megatron.config package."""
