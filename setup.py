"""Packaging for osp_megatron: a megatron-core framework for sparse text-to-video Diffusion Transformers."""

from setuptools import find_packages, setup

# import name -> folder of the command-line tools
TOOLS = {"osp_data": "data", "osp_launch": "launch", "osp_ckpt": "checkpoints_tools"}

setup(
    name="osp-megatron",
    version="0.1.0",
    description="Megatron-core framework for training Wan2.1-style video DiTs with Skiparse attention, "
    "sparse sequence parallelism and HiF8 training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The tools keep their folders (data/, launch/, checkpoints_tools/) but install under names of their own, so
    # that they never shadow, nor are shadowed by, a user's `data` or `launch` module.
    packages=find_packages(include=["osp_megatron*"]) + list(TOOLS),
    package_dir=TOOLS,
    package_data={"osp_megatron": ["configs/*.yaml", "training/activation_profiles.json"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "einops>=0.7",
        "pyyaml",
        "safetensors",
        "webdataset>=0.2.86",
        "av>=12",
        "tensorboard",
        "tqdm",
        "psutil",
        "submitit>=1.5,<1.6",  # Slurm submission (osp-launch); pinned: osp-launch renders its sbatch script
        "diffusers>=0.33",
        "transformers>=4.45",
        "sentencepiece",
        "peft>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "ruff>=0.6"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]", "nvidia-cudnn-frontend>=1.14"],
        # FlashAttention in CuTe DSL: attention backend "flash_attn_4", and auto on Hopper where it measures faster.
        # Its own pre-release line; b36 is the release whose API (flash_attn_func -> (out, lse)) is used.
        "fa4": ["flash-attn-4>=4.0.0b36"],
        "ulysses-baseline": ["deepspeed"],
        "npu": ["torch_npu"],
        "eval": ["vbench"],
        "rewards": ["open-clip-torch"],
    },
    entry_points={
        "console_scripts": [
            "osp-train=osp_megatron.training.cli:main",
            "osp-grpo=osp_megatron.rl.cli:main",
            "osp-sample=osp_megatron.inference.cli:main",
            "osp-eval=osp_megatron.eval.cli:main",
            "osp-make-synthetic=osp_megatron.engine.data:main",
            "osp-ckpt=osp_ckpt.cli:main",
            "osp-data=osp_data.cli:main",
            "osp-launch=osp_launch.cli:main",
        ]
    },
)
