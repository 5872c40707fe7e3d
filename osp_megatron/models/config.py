"""Model configuration of the Wan2.1-style DiT: presets with the published dimensions, per-field overrides.

Also decides the per-block attention layout of the hybrid full/Skiparse model (OSP-Next's "dual end").
"""

from dataclasses import dataclass, field, fields
from typing import Literal

from osp_megatron.config.errors import ConfigError

PARAMS_DTYPES = ("float32", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype of a `model.params_dtype` name (torch is imported here, not when configs load)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# Published Wan2.1 dimensions (docs/training.md, "Configs and presets"); "tiny" is a CPU test model whose head
# count (4) admits every sequence-parallel layout the tests use (TP x Ulysses x SSP up to 4) and whose head_dim keeps
# 3D RoPE splittable.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        dim=64,
        num_layers=4,
        num_heads=4,
        ffn_dim=128,
        text_dim=32,
        text_len=32,
        full_blocks=1,
    ),
    "wan-1.3b": dict(
        dim=1536,
        num_layers=30,
        num_heads=12,
        ffn_dim=8960,
        text_dim=4096,
        text_len=512,
        full_blocks=4,
    ),
    "wan-14b": dict(
        dim=5120,
        num_layers=40,
        num_heads=40,
        ffn_dim=13824,
        text_dim=4096,
        text_len=512,
        full_blocks=4,
    ),
}

# What naming a preset decides: its dimensions, plus three choices that belong to one model size and fall back
# to their defaults (block_layout has one entry per block; absolute_positions and the tiny-block VAE are the tiny
# example's). A configuration layer that names model.preset resets these keys of the layers below it, so
# `osp-train model.preset=wan-1.3b` over the tiny example's dim 128 gives wan-1.3b, not a mix of the two.
PRESET_KEYS = (*PRESETS["tiny"], "block_layout", "absolute_positions", "vae")

BLOCK_KINDS = ("full", "token", "group")
# model.activation_checkpointing: "full" recomputes whole blocks in the backward, "selective" keeps the attention
# core's saved tensors (its inputs, output and softmax statistics) and recomputes the rest of each block.
CHECKPOINTING_MODES = ("none", "full", "selective")


@dataclass
class ModelConfig:
    """The DiT's architecture; `preset` fills every dimension that the user does not set explicitly."""

    preset: Literal["tiny", "wan-1.3b", "wan-14b"] = "tiny"
    dim: int = 64
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    text_dim: int = 32
    text_len: int = 32
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    # Fixed 3D sine-cosine positions added to the patch tokens (as DiT, PixArt and Latte do) beside 3D RoPE.
    # Wan2.1 has none (false); a tiny model trained for minutes needs them to place a caption's content in
    # the frame (docs/training.md, "What the tiny DiT learns"). Parameter-free: weights are unchanged.
    absolute_positions: bool = False
    # Skiparse: sparse_ratio P (1 = every block full attention). With P > 1 the first and last
    # `full_blocks` blocks stay full and the others alternate token (even index) / group (odd index);
    # `block_layout` overrides that with an explicit list of "full" / "token" / "group".
    sparse_ratio: int = 1
    full_blocks: int = 4
    block_layout: list[str] | None = None
    attention_backend: str = "auto"
    # none | full | selective (true and false mean full and none); see CHECKPOINTING_MODES and docs/memory.md
    activation_checkpointing: Literal["none", "full", "selective"] | bool = "none"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    # torch.compile every block (one graph per block kind and shape), in every job that runs the model.
    compile: bool = False
    # Local directories of the frozen encoders; null builds tiny random-weight ones (tests, CPU demo).
    vae_path: str | None = None
    text_encoder_path: str | None = None
    # The built-in VAE when vae_path is null: "tiny-random" (random weights, for tests) or "tiny-block" (a
    # closed-form block codec that reconstructs the synthetic caption videos; the synthetic set then holds the
    # latents of rendered pixel videos).
    vae: Literal["tiny-random", "tiny-block"] = "tiny-random"

    def __post_init__(self):
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"

    @classmethod
    def resolve_defaults(cls, data: dict, prefix: str) -> dict:
        preset = data.get("preset", cls.preset)
        if preset not in PRESETS:
            raise ConfigError(f"{prefix}.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = dict(PRESETS[preset])
        merged.update(data)
        return merged

    @classmethod
    def keys_reset_by(cls, layer: dict) -> tuple[str, ...]:
        """Keys of the layers below that a configuration layer resets: PRESET_KEYS when it names a preset."""
        return PRESET_KEYS if "preset" in layer else ()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        def need(ok: bool, key: str, message: str):
            if not ok:
                raise ConfigError(f"{prefix}.{key}: {message}")

        for name in (
            "dim",
            "num_layers",
            "num_heads",
            "ffn_dim",
            "in_channels",
            "out_channels",
            "text_dim",
            "text_len",
            "freq_dim",
            "sparse_ratio",
        ):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(
            self.dim % self.num_heads == 0,
            "num_heads",
            f"dim {self.dim} is not divisible by num_heads {self.num_heads}",
        )
        need(
            self.head_dim % 2 == 0 and self.head_dim >= 6,
            "dim",
            f"head_dim = dim / num_heads = {self.head_dim} must be even and >= 6 for 3D RoPE",
        )
        need(self.freq_dim % 2 == 0, "freq_dim", f"must be even, got {self.freq_dim}")
        need(
            self.vae_path is None or self.vae == "tiny-random",
            "vae",
            f"{self.vae} is a built-in VAE and cannot be combined with {prefix}.vae_path={self.vae_path!r}; "
            "set one of them",
        )
        need(
            self.vae != "tiny-block" or self.in_channels == self.out_channels == 16,
            "vae",
            f"tiny-block has 16 latent channels, but {prefix}.in_channels={self.in_channels} and "
            f"{prefix}.out_channels={self.out_channels}; set {prefix}.vae=tiny-random for other channel counts",
        )
        need(
            len(self.patch_size) == 3 and all(p >= 1 for p in self.patch_size),
            "patch_size",
            f"must be three positive integers (t, h, w), got {self.patch_size}",
        )
        need(
            self.activation_checkpointing in CHECKPOINTING_MODES,
            "activation_checkpointing",
            f"got {self.activation_checkpointing!r}; allowed: {', '.join(CHECKPOINTING_MODES)} (or true / false)",
        )
        need(self.full_blocks >= 0, "full_blocks", f"must be >= 0, got {self.full_blocks}")
        if self.block_layout is not None:
            need(
                len(self.block_layout) == self.num_layers,
                "block_layout",
                f"has {len(self.block_layout)} entries but num_layers is {self.num_layers}",
            )
            bad = [kind for kind in self.block_layout if kind not in BLOCK_KINDS]
            need(not bad, "block_layout", f"unknown block kinds {bad}; allowed: {', '.join(BLOCK_KINDS)}")
            need(
                self.sparse_ratio > 1 or all(k == "full" for k in self.block_layout),
                "block_layout",
                "sparse blocks need model.sparse_ratio > 1",
            )

    def block_kinds(self) -> list[str]:
        """Attention kind of every block: 'full', 'token' or 'group'."""
        if self.block_layout is not None:
            return list(self.block_layout)
        if self.sparse_ratio == 1:
            return ["full"] * self.num_layers
        kinds = []
        for index in range(self.num_layers):
            if index < self.full_blocks or index >= self.num_layers - self.full_blocks:
                kinds.append("full")
            else:
                kinds.append("token" if index % 2 == 0 else "group")
        return kinds


def model_config_keys() -> list[str]:
    return [f.name for f in fields(ModelConfig)]
