"""osp_megatron.quantization package."""
