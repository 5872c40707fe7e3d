"""osp_megatron.inference package."""
