"""osp_megatron.parallel package."""
