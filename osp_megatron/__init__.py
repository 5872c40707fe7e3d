"""osp_megatron: train Wan2.1-style text-to-video Diffusion Transformers with megatron-core.

Hybrid full/Skiparse-2D attention, sparse sequence parallelism, HiF8 training and Mix-GRPO post-training.
"""

__version__ = "0.1.0"
