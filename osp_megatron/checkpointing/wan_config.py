"""ModelConfig <-> the config.json of diffusers' WanTransformer3DModel and of Wan's original WanModel.

Where no config file exists, the dimensions are read off the weight shapes (all but the head count).
"""

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.models.config import PRESETS, ModelConfig

DIFFUSERS_CLASS = "WanTransformer3DModel"
ORIGINAL_CLASS = "WanModel"
# umT5's context length; diffusers' Wan pipelines pad prompts to it and the config does not record it.
WAN_TEXT_LEN = 512
WAN_HEAD_DIM = 128

# diffusers config keys that add inputs this model does not have (image conditioning, first-last frame).
_DIFFUSERS_UNSUPPORTED = {
    "image_dim": "image conditioning (Wan2.1 I2V / FLF2V)",
    "added_kv_proj_dim": "image-conditioned cross-attention (Wan2.1 I2V / FLF2V)",
    "pos_embed_seq_len": "first-last-frame image embeddings (Wan2.1 FLF2V)",
}
_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "rope_max_seq_len"}


def config_kind(config: dict) -> str | None:
    """'diffusers' or 'original' for a Wan transformer config.json; None for anything else."""
    name = config.get("_class_name")
    if name == DIFFUSERS_CLASS or (name is None and "num_attention_heads" in config):
        return "diffusers"
    if name == ORIGINAL_CLASS or (name is None and "num_heads" in config and "dim" in config):
        return "original"
    return None


def fields_from_diffusers(config: dict, source: str) -> dict:
    """ModelConfig fields from a WanTransformer3DModel config; unsupported options raise ConfigError."""
    name = config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise ConfigError(f"{source}: _class_name {name!r} is not supported; only {DIFFUSERS_CLASS} (text-to-video)")
    for key, what in _DIFFUSERS_UNSUPPORTED.items():
        if config.get(key) is not None:
            raise ConfigError(
                f"{source}: {key}={config[key]!r} means {what}, which this text-to-video model does not support"
            )
    qk_norm = config.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise ConfigError(
            f"{source}: qk_norm={qk_norm!r} is not supported; the model normalises q and k with 'rms_norm_across_heads'"
        )
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", WAN_HEAD_DIM)
    fields = dict(
        dim=heads * head_dim,
        num_heads=heads,
        num_layers=config.get("num_layers", 40),
        ffn_dim=config.get("ffn_dim", 13824),
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels") or config.get("in_channels", 16),
        patch_size=list(config.get("patch_size", [1, 2, 2])),
        text_dim=config.get("text_dim", 4096),
        text_len=WAN_TEXT_LEN,
        freq_dim=config.get("freq_dim", 256),
        eps=config.get("eps", 1e-6),
        cross_attn_norm=config.get("cross_attn_norm", True),
    )
    known = (
        set(_DIFFUSERS_UNSUPPORTED)
        | _DIFFUSERS_IGNORED
        | {
            "num_attention_heads",
            "attention_head_dim",
            "num_layers",
            "ffn_dim",
            "in_channels",
            "out_channels",
            "patch_size",
            "text_dim",
            "freq_dim",
            "eps",
            "cross_attn_norm",
            "qk_norm",
        }
    )
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown {DIFFUSERS_CLASS} options {unknown}; this converter does not know what they change"
        )
    return fields


def fields_from_original(config: dict, source: str) -> dict:
    """ModelConfig fields from Wan's original WanModel config.json (text-to-video only)."""
    model_type = config.get("model_type", "t2v")
    if model_type != "t2v":
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported; only 't2v' (text-to-video)")
    if not config.get("qk_norm", True):
        raise ConfigError(f"{source}: qk_norm=false is not supported; the model always normalises q and k")
    window = list(config.get("window_size", [-1, -1]))
    if window != [-1, -1]:
        raise ConfigError(f"{source}: window_size={window} (local attention) is not supported")
    renames = {
        "dim": "dim",
        "num_heads": "num_heads",
        "num_layers": "num_layers",
        "ffn_dim": "ffn_dim",
        "in_dim": "in_channels",
        "out_dim": "out_channels",
        "patch_size": "patch_size",
        "text_dim": "text_dim",
        "text_len": "text_len",
        "freq_dim": "freq_dim",
        "eps": "eps",
        "cross_attn_norm": "cross_attn_norm",
    }
    fields = {ours: config[theirs] for theirs, ours in renames.items() if theirs in config}
    if "patch_size" in fields:
        fields["patch_size"] = list(fields["patch_size"])
    fields.setdefault("text_len", WAN_TEXT_LEN)
    return fields


def fields_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Every dimension the weights (under our names) determine; the head count is not among them."""
    try:
        dim, in_channels, *patch = shapes["patch_embedding.weight"]
        fields = dict(
            dim=dim,
            in_channels=in_channels,
            patch_size=list(patch),
            text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1],
            num_layers=len({name.split(".")[1] for name in shapes if name.startswith("blocks.")}),
            ffn_dim=shapes["blocks.0.mlp.linear_fc1.weight"][0],
            cross_attn_norm="blocks.0.norm2.weight" in shapes,
            text_len=WAN_TEXT_LEN,
        )
        outputs = shapes["proj_out.weight"][0]
    except (KeyError, ValueError):
        raise ConfigError(
            "the weights lack the tensors that determine the model size (patch_embedding, "
            "text_embedding.0, time_embedding.0, blocks.0.ffn / mlp, head.head / proj_out)"
        ) from None
    volume = patch[0] * patch[1] * patch[2]
    if outputs % volume:
        raise ConfigError(f"output projection has {outputs} rows, not a multiple of the patch volume {volume}")
    fields["out_channels"] = outputs // volume
    return fields


def default_num_heads(dim: int) -> int | None:
    """Wan's head count for a width: a preset's when one matches, else head_dim 128 when it divides."""
    for preset in PRESETS.values():
        if preset["dim"] == dim:
            return preset["num_heads"]
    return dim // WAN_HEAD_DIM if dim % WAN_HEAD_DIM == 0 else None


def make_model_config(fields: dict, overrides: dict | None = None, source: str = "") -> ModelConfig:
    """A validated ModelConfig from converted fields plus user overrides (any ModelConfig field)."""
    data = dict(fields)
    data.update(overrides or {})
    if "num_heads" not in data:
        heads = default_num_heads(data.get("dim", 0))
        if heads is None:
            raise ConfigError(
                f"{source}: the weights do not say how many attention heads dim={data.get('dim')} "
                "is split into and there is no config.json; set num_heads explicitly"
            )
        data["num_heads"] = heads
    if "preset" not in data:
        data["preset"] = _closest_preset(data)
    return from_dict(ModelConfig, data, "model")


def _closest_preset(data: dict) -> str:
    """The preset whose dimensions match (only its non-dimension defaults, e.g. full_blocks, are used)."""
    for name, preset in PRESETS.items():
        if all(data.get(key) == value for key, value in preset.items() if key in ("dim", "num_layers", "num_heads")):
            return name
    return "tiny" if data.get("num_layers", 0) < 8 else "wan-1.3b"


def diffusers_config(config: ModelConfig, diffusers_version: str) -> dict:
    """config.json of the WanTransformer3DModel holding the same weights."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": diffusers_version,
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def original_config(config: ModelConfig) -> dict:
    """config.json of Wan2.1's own WanModel (text-to-video) holding the same weights."""
    return {
        "_class_name": ORIGINAL_CLASS,
        "model_type": "t2v",
        "patch_size": list(config.patch_size),
        "text_len": config.text_len,
        "in_dim": config.in_channels,
        "dim": config.dim,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "text_dim": config.text_dim,
        "out_dim": config.out_channels,
        "num_heads": config.num_heads,
        "num_layers": config.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": config.cross_attn_norm,
        "eps": config.eps,
    }
