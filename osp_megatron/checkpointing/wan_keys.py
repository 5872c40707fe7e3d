"""Parameter names of the Wan2.1 DiT in three layouts: this framework's, Wan's original, and diffusers'.

Also the full shape and tensor-parallel split dim of each of our parameters, so converters need no model.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod

from osp_megatron.models.config import ModelConfig

OURS, ORIGINAL, DIFFUSERS = "ours", "original", "diffusers"
LAYOUTS = (OURS, ORIGINAL, DIFFUSERS)

# megatron-core splits ColumnParallelLinear outputs (weight and bias) and the head-sharded q/k RMSNorm weights
# along dim 0, RowParallelLinear inputs along dim 1; everything else is replicated on every rank.
COLUMN, ROW, REPLICATED = 0, 1, None

# (ours, original, diffusers, split dim) of the parameters outside the blocks.
_GLOBAL = [
    ("patch_embedding.weight", "patch_embedding.weight", "patch_embedding.weight", REPLICATED),
    ("patch_embedding.bias", "patch_embedding.bias", "patch_embedding.bias", REPLICATED),
    ("head_modulation", "head.modulation", "scale_shift_table", REPLICATED),
    ("proj_out.weight", "head.head.weight", "proj_out.weight", REPLICATED),
    ("proj_out.bias", "head.head.bias", "proj_out.bias", REPLICATED),
]
for _ours, _original, _diffusers in [
    ("text_embedding.0", "text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "time_projection.1", "condition_embedder.time_proj"),
]:
    for _kind in ("weight", "bias"):
        _GLOBAL.append((f"{_ours}.{_kind}", f"{_original}.{_kind}", f"{_diffusers}.{_kind}", REPLICATED))

# The same for the parameters of one block, relative to its prefix `blocks.N.`. Wan's original code calls the
# affine cross-attention norm `norm3` (and the FFN norm, which has no parameters, `norm2`); diffusers and we
# call the cross-attention norm `norm2`.
_BLOCK = [
    ("modulation", "modulation", "scale_shift_table", REPLICATED),
    ("norm2.weight", "norm3.weight", "norm2.weight", REPLICATED),
    ("norm2.bias", "norm3.bias", "norm2.bias", REPLICATED),
    ("mlp.linear_fc1.weight", "ffn.0.weight", "ffn.net.0.proj.weight", COLUMN),
    ("mlp.linear_fc1.bias", "ffn.0.bias", "ffn.net.0.proj.bias", COLUMN),
    ("mlp.linear_fc2.weight", "ffn.2.weight", "ffn.net.2.weight", ROW),
    ("mlp.linear_fc2.bias", "ffn.2.bias", "ffn.net.2.bias", REPLICATED),
]
for _ours, _original, _diffusers in [
    ("self_attention", "self_attn", "attn1"),
    ("cross_attention", "cross_attn", "attn2"),
]:
    for _our_linear, _original_linear, _diffusers_linear in [
        ("linear_q", "q", "to_q"),
        ("linear_k", "k", "to_k"),
        ("linear_v", "v", "to_v"),
    ]:
        for _kind in ("weight", "bias"):
            _BLOCK.append(
                (
                    f"{_ours}.{_our_linear}.{_kind}",
                    f"{_original}.{_original_linear}.{_kind}",
                    f"{_diffusers}.{_diffusers_linear}.{_kind}",
                    COLUMN,
                )
            )
    _BLOCK += [
        (f"{_ours}.q_norm.weight", f"{_original}.norm_q.weight", f"{_diffusers}.norm_q.weight", COLUMN),
        (f"{_ours}.k_norm.weight", f"{_original}.norm_k.weight", f"{_diffusers}.norm_k.weight", COLUMN),
        (f"{_ours}.linear_proj.weight", f"{_original}.o.weight", f"{_diffusers}.to_out.0.weight", ROW),
        (f"{_ours}.linear_proj.bias", f"{_original}.o.bias", f"{_diffusers}.to_out.0.bias", REPLICATED),
    ]

_COLUMNS = {OURS: 0, ORIGINAL: 1, DIFFUSERS: 2}
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

# diffusers can fuse an attention's projections (`fuse_qkv_projections`): self-attention q, k, v into `to_qkv`,
# cross-attention k, v into `to_kv`, concatenated along the output dim. A state dict saved from a fused model
# holds the fused tensor (and, until unfused, the separate ones as well).
_DIFFUSERS_FUSED = {
    "attn1.to_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.to_kv": ("attn2.to_k", "attn2.to_v"),
}
# Keys diffusers itself drops when loading a Wan transformer.
_DIFFUSERS_IGNORED = re.compile(r"\.norm_added_q\.")
# A parameter name every layout shares; it locates a wrapping prefix such as `model.diffusion_model.`.
ANCHOR = "patch_embedding.weight"


@dataclass(frozen=True)
class ParameterInfo:
    """Full (unsharded) shape of one of our parameters and the dim tensor parallelism splits it along."""

    shape: tuple[int, ...]
    partition_dim: int | None


@dataclass(frozen=True)
class Piece:
    """Where one of our parameters comes from: a source tensor, or part `index` of `parts` of a fused one."""

    source: str
    index: int = 0
    parts: int = 1


def _table(name: str, source: int, target: int) -> str | None:
    match = _BLOCK_NAME.match(name)
    if match:
        block, rest = match.groups()
        for row in _BLOCK:
            if row[source] == rest:
                return f"blocks.{block}.{row[target]}"
        return None
    for row in _GLOBAL:
        if row[source] == name:
            return row[target]
    return None


def rename(name: str, source_layout: str, target_layout: str) -> str | None:
    """A parameter's name in `target_layout`, or None when `name` is no parameter of `source_layout`."""
    return _table(name, _COLUMNS[source_layout], _COLUMNS[target_layout])


def parameter_layout(config: ModelConfig) -> dict[str, ParameterInfo]:
    """Every parameter of WanDiT(config) at tensor-parallel size 1, in module registration order."""
    dim, ffn, patch = config.dim, config.ffn_dim, tuple(config.patch_size)
    shapes = {
        "head_modulation": (1, 2, dim),
        "patch_embedding.weight": (dim, config.in_channels, *patch),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, config.text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, config.freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
    }
    block_shapes = {"modulation": (1, 6, dim)}
    for attention in ("self_attention", "cross_attention"):
        for linear in ("linear_q", "linear_k", "linear_v"):
            block_shapes[f"{attention}.{linear}.weight"] = (dim, dim)
            block_shapes[f"{attention}.{linear}.bias"] = (dim,)
        block_shapes[f"{attention}.q_norm.weight"] = (dim,)
        block_shapes[f"{attention}.k_norm.weight"] = (dim,)
        block_shapes[f"{attention}.linear_proj.weight"] = (dim, dim)
        block_shapes[f"{attention}.linear_proj.bias"] = (dim,)
        if attention == "self_attention" and config.cross_attn_norm:
            block_shapes["norm2.weight"] = block_shapes["norm2.bias"] = (dim,)
    block_shapes.update(
        {
            "mlp.linear_fc1.weight": (ffn, dim),
            "mlp.linear_fc1.bias": (ffn,),
            "mlp.linear_fc2.weight": (dim, ffn),
            "mlp.linear_fc2.bias": (dim,),
        }
    )
    for block in range(config.num_layers):
        for rest, shape in block_shapes.items():
            shapes[f"blocks.{block}.{rest}"] = shape
    shapes["proj_out.weight"] = (config.out_channels * prod(patch), dim)
    shapes["proj_out.bias"] = (config.out_channels * prod(patch),)
    return {name: ParameterInfo(shape, partition_dim_of(name)) for name, shape in shapes.items()}


def partition_dim_of(name: str) -> int | None:
    """The dim megatron-core splits our parameter `name` along (None: replicated)."""
    match = _BLOCK_NAME.match(name)
    rows = _BLOCK if match else _GLOBAL
    rest = match.group(2) if match else name
    for row in rows:
        if row[0] == rest:
            return row[3]
    raise KeyError(f"{name!r} is not a parameter of the Wan DiT")


def find_prefix(keys: Iterable[str]) -> str | None:
    """The prefix wrapping a state dict's parameter names (often '' or 'model.diffusion_model.'), or None."""
    candidates = sorted((key[: -len(ANCHOR)] for key in keys if key.endswith(ANCHOR)), key=len)
    return candidates[0] if candidates else None


def detect_layout(keys: Iterable[str]) -> str | None:
    """Which naming a set of (prefix-free) parameter names follows, or None when it is no Wan DiT at all."""
    keys = set(keys)
    if any(key.startswith("condition_embedder.") for key in keys) or "scale_shift_table" in keys:
        return DIFFUSERS
    if "head_modulation" in keys or any(".self_attention." in key for key in keys):
        return OURS
    if "head.modulation" in keys or "head.head.weight" in keys or any(".self_attn." in key for key in keys):
        return ORIGINAL
    return None


def plan_sources(targets: Iterable[str], source_keys: Iterable[str], layout: str):
    """Match our parameter names to the tensors of a source state dict in `layout`.

    Returns (pieces: our name -> Piece, missing our names, unexpected source keys). Fused diffusers
    projections are split when the separate ones are absent, and count as used when they are present.
    """
    source_keys = set(source_keys)
    pieces, missing, used = {}, [], set()
    for name in targets:
        source = rename(name, OURS, layout)
        if source in source_keys:
            pieces[name] = Piece(source)
            used.add(source)
            continue
        fused = _fused_piece(source, source_keys) if layout == DIFFUSERS and source else None
        if fused is None:
            missing.append(name)
        else:
            pieces[name] = fused
            used.add(fused.source)
    for key in source_keys - used:
        if layout == DIFFUSERS and (_DIFFUSERS_IGNORED.search(key) or _is_redundant_fused(key, used)):
            used.add(key)
    unexpected = sorted(source_keys - used)
    return pieces, missing, unexpected


def _split_block(name: str) -> tuple[str, str]:
    match = _BLOCK_NAME.match(name)
    return (f"blocks.{match.group(1)}.", match.group(2)) if match else ("", name)


def _fused_piece(source: str, source_keys: set[str]) -> Piece | None:
    prefix, rest = _split_block(source)
    for fused, members in _DIFFUSERS_FUSED.items():
        for index, member in enumerate(members):
            if rest.startswith(member + "."):
                candidate = prefix + fused + rest[len(member) :]
                if candidate in source_keys:
                    return Piece(candidate, index, len(members))
    return None


def _is_redundant_fused(key: str, used: set[str]) -> bool:
    """A fused projection whose separate members were all loaded directly carries nothing new."""
    prefix, rest = _split_block(key)
    for fused, members in _DIFFUSERS_FUSED.items():
        if rest.startswith(fused + "."):
            suffix = rest[len(fused) :]
            return all(prefix + member + suffix in used for member in members)
    return False
