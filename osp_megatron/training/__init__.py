"""osp_megatron.training package."""
