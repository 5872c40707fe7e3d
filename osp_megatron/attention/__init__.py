"""osp_megatron.attention package."""
