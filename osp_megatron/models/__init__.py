"""The DiT, its configuration and presets, construction for the tensor-parallel size, the VAE and text encoder.

Published weights load through osp_megatron.checkpointing.pretrained (load_pretrained).
"""
