"""The Wan2.1 text-to-video DiT on megatron-core: patch embedding, condition embedder, blocks, output head.

forward(latents [B, C, T, H, W], timestep [B], text_states [B, L, text_dim]) -> velocity [B, C, T, H, W].
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from osp_megatron.attention.rope import sincos_positions
from osp_megatron.config.errors import ConfigError
from osp_megatron.models.config import ModelConfig, torch_dtype
from osp_megatron.models.wan import fused
from osp_megatron.models.wan.layers import FP32LayerNorm
from osp_megatron.models.wan.spec import wan_layer_spec
from osp_megatron.parallel.layout import LocalTokenLayout


def build_transformer_config(
    model: ModelConfig, tensor_parallel: int = 1, cpu_initialization: bool = True, perform_initialization: bool = True
) -> TransformerConfig:
    """megatron-core TransformerConfig for the DiT blocks (Wan uses xavier-uniform linears, GELU-tanh FFN)."""
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.dim,
        num_attention_heads=model.num_heads,
        ffn_hidden_size=model.ffn_dim,
        layernorm_epsilon=model.eps,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=fused.gelu_tanh,
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
        init_method=torch.nn.init.xavier_uniform_,
        output_layer_init_method=torch.nn.init.xavier_uniform_,
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=cpu_initialization,
        perform_initialization=perform_initialization,
        params_dtype=torch_dtype(model.params_dtype),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def sinusoidal_timestep_embedding(timestep: torch.Tensor, channels: int) -> torch.Tensor:
    """[cos | sin] of timestep x 10000^(-i/half) (float32), the frequency embedding Wan feeds its MLP."""
    half = channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class WanDiT(MegatronModule):
    """Wan2.1 DiT with per-block attention kinds ("full", "token", "group") and a pluggable token layout."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: TransformerConfig,
        layer_spec: ModuleSpec | None = None,
        layout_factory: Callable | None = None,
    ):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if model_config.num_heads % tp:
            raise ConfigError(f"model.num_heads={model_config.num_heads} is not divisible by parallel.tensor={tp}")
        self.model_config = model_config
        dim, patch = model_config.dim, tuple(model_config.patch_size)
        self.patch_size = patch
        self.block_kinds = model_config.block_kinds()
        # Set from outside by the engine (engine/parallelize.py): how tokens sit on ranks between blocks, and
        # which activations the blocks keep for the backward ("none", "selective", "full").
        self.layout_factory = layout_factory or LocalTokenLayout
        self.activation_checkpointing = model_config.activation_checkpointing
        self.patch_embedding = torch.nn.Conv3d(model_config.in_channels, dim, kernel_size=patch, stride=patch)
        self.text_embedding = torch.nn.Sequential(
            torch.nn.Linear(model_config.text_dim, dim), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(dim, dim)
        )
        self.time_embedding = torch.nn.Sequential(
            torch.nn.Linear(model_config.freq_dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
        )
        self.time_projection = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 6 * dim))
        spec = layer_spec or wan_layer_spec(cross_attn_norm=model_config.cross_attn_norm)
        self.blocks = torch.nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(model_config.num_layers)]
        )
        self.norm_out = FP32LayerNorm(dim, model_config.eps, elementwise_affine=False)
        self.head_modulation = torch.nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.proj_out = torch.nn.Linear(dim, model_config.out_channels * math.prod(patch))
        if config.perform_initialization:
            self._init_weights()

    def _init_weights(self):
        """Wan2.1's initialisation: xavier linears and patch embedding, small-normal embedders, zero head."""
        for module in [*self.text_embedding, *self.time_embedding, *self.time_projection]:
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        torch.nn.init.zeros_(self.patch_embedding.bias)
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)

    def token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        _, _, frames, height, width = latents.shape
        pt, ph, pw = self.patch_size
        if frames % pt or height % ph or width % pw:
            raise ConfigError(
                f"latent shape (T={frames}, H={height}, W={width}) is not divisible by model.patch_size "
                f"{list(self.patch_size)}"
            )
        return frames // pt, height // ph, width // pw

    def embed_patches(self, latents: torch.Tensor, grid) -> torch.Tensor:
        """Patch embedding [B, C, T, H, W] -> tokens [B, N, dim] in row-major (t, h, w) order.

        The Conv3d's stride equals its kernel, so it is one GEMM over flattened patches; computing it that
        way writes the tokens directly in [B, N, dim] order instead of transposing the conv's [B, dim, N]
        output (a full pass over the hidden states, forward and backward).
        """
        batch, channels = latents.shape[:2]
        (pt, ph, pw), (frames, height, width) = self.patch_size, grid
        patches = latents.reshape(batch, channels, frames, pt, height, ph, width, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, frames * height * width, -1)
        conv = self.patch_embedding
        return F.linear(patches, conv.weight.flatten(1), conv.bias)

    def embed_conditions(self, timestep: torch.Tensor, text_states: torch.Tensor):
        """(time embedding [B, dim], 6-way modulation [B, 6, dim], text tokens [B, L, dim])."""
        frequencies = sinusoidal_timestep_embedding(timestep, self.model_config.freq_dim)
        time_linear = self.time_embedding[0]
        time = self.time_embedding(frequencies.to(time_linear.weight.dtype)).type_as(text_states)
        modulation = self.time_projection(time).unflatten(1, (6, -1))
        return time, modulation, self.text_embedding(text_states)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        batch, channels = latents.shape[:2]
        if channels != self.model_config.in_channels:
            raise ConfigError(
                f"latents have {channels} channels but model.in_channels is {self.model_config.in_channels}"
            )
        if text_states.shape[-1] != self.model_config.text_dim:
            raise ConfigError(
                f"text_states last dim is {text_states.shape[-1]} but model.text_dim is {self.model_config.text_dim}"
            )
        grid = self.token_grid(latents)
        layout = self.layout_factory(
            grid,
            self.model_config.sparse_ratio,
            self.model_config.head_dim,
            self.model_config.rope_theta,
            latents.device,
            backend=self.model_config.attention_backend,
        )
        hidden = self.embed_patches(latents, grid)
        if self.model_config.absolute_positions:
            hidden = hidden + sincos_positions(grid, hidden.shape[-1], device=hidden.device).to(hidden.dtype)
        time, modulation, text = self.embed_conditions(timestep, text_states)

        # Nothing is kept for a backward when no gradient is recorded.
        recompute = self.activation_checkpointing if torch.is_grad_enabled() else "none"
        kind = self.block_kinds[0]
        hidden = layout.enter(hidden, kind)
        for block, block_kind in zip(self.blocks, self.block_kinds):
            hidden = layout.switch(hidden, kind, block_kind)
            kind = block_kind
            args = (hidden, text, modulation, layout.rope(kind), layout.attention_context(kind))
            if recompute == "full":
                hidden = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden = block(*args, selective_recompute=recompute == "selective")
        hidden = layout.exit(hidden, kind)

        shift, scale = (self.head_modulation + time.unsqueeze(1).float()).chunk(2, dim=1)
        hidden = fused.modulated_layer_norm(hidden, shift, scale, self.norm_out.eps)
        out = self.proj_out(hidden)
        return self.unpatchify(out, batch, grid)

    def unpatchify(self, tokens: torch.Tensor, batch: int, grid) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        frames, height, width = grid
        out = tokens.reshape(batch, frames, height, width, pt, ph, pw, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, out.shape[1], frames * pt, height * ph, width * pw)
