"""osp-ckpt: import published Wan2.1 / OSP-Next DiT weights, export to diffusers, inspect checkpoints.

The conversions live in osp_megatron.checkpointing.wan_convert and .wan_export; this is the command line.
"""
