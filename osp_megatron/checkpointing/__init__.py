"""osp_megatron.checkpointing package."""
