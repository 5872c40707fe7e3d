"""osp_megatron.data package."""
