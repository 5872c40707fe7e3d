"""Configuration: YAML + dotted overrides build typed dataclasses; every bad key or value is named."""

from importlib import resources
from pathlib import Path

import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict, parse_override
from osp_megatron.engine.config import JobConfig, load_job_config
from osp_megatron.models.config import PRESETS, ModelConfig

EXAMPLE = "examples/tiny_t2v.yaml"


def test_example_config_loads_with_overrides():
    """The tiny example loads, and dotted overrides reach nested fields with YAML typing."""
    config = load_job_config(EXAMPLE, ["train.steps=7", "model.num_layers=6", "train.lr=1e-3", "run.dir=/tmp/x"])
    assert config.train.steps == 7 and config.model.num_layers == 6 and config.train.lr == 1e-3
    assert config.run.dir == "/tmp/x" and config.model.dim == 128 and config.model.num_heads == 4


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.stepz=3", "train.stepz"),
        ("model.preset=wan-7b", "model.preset"),
        ("train.steps=three", "train.steps"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("parallel.tensor=0", "parallel.tensor"),
        ("model.num_heads=5", "model.num_heads"),
        ("bogus.key=1", "bogus"),
        ("train.global_batch_size=7", "train.global_batch_size"),
        ("data.text_dim=48", "data.text_dim"),
        ("model.block_layout=[full,sparse,full,full]", "model.block_layout"),
        ("checkpoint.interval=-1", "checkpoint.interval"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, named):
    """Unknown keys, wrong types and out-of-range values raise ConfigError naming the dotted key."""
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        load_job_config(EXAMPLE, [override])


@pytest.mark.parametrize("example", ["tiny_t2v", "train_osp_data", "train_wan13b_480p", "wan14b_fsdp"])
def test_example_training_configs_load(example):
    """Every training example in examples/ resolves to a valid job config as shipped."""
    assert isinstance(load_job_config(f"examples/{example}.yaml"), JobConfig)


def test_wan13b_480p_example_trains_the_imported_model_on_480p_shards():
    """The wan-1.3b example names the published size, the imported weights and umT5's text states."""
    config = load_job_config("examples/train_wan13b_480p.yaml")
    assert {key: getattr(config.model, key) for key in PRESETS["wan-1.3b"]} == PRESETS["wan-1.3b"]
    assert config.checkpoint.load == "ckpt/wan2.1-t2v-1.3b" and not config.data.synthetic
    assert (config.data.text_dim, config.data.text_len) == (4096, 512)
    assert (config.data.latent_frames, config.data.latent_height, config.data.latent_width) == (21, 60, 104)


def test_override_needs_equals_sign():
    """An override without '=' is rejected with the offending text."""
    with pytest.raises(ConfigError, match="key.subkey=value"):
        parse_override("train.steps")


def test_presets_fill_dimensions_and_fields_override_them():
    """model.preset sets published dimensions; explicit fields win over the preset."""
    big = from_dict(ModelConfig, {"preset": "wan-14b"}, "model")
    assert (big.dim, big.num_layers, big.num_heads, big.ffn_dim, big.head_dim) == (5120, 40, 40, 13824, 128)
    small = from_dict(ModelConfig, {"preset": "wan-1.3b", "num_layers": 2}, "model")
    assert (small.dim, small.num_layers, small.num_heads, small.ffn_dim) == (1536, 2, 12, 8960)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_on_the_command_line_gives_its_architecture(preset):
    """model.preset given as an override over the tiny example (dim 128, absolute positions, tiny-block VAE)
    resets what a preset decides: the preset's dimensions, and the tiny example's choices back to defaults."""
    config = load_job_config(EXAMPLE, [f"model.preset={preset}"])
    assert {key: getattr(config.model, key) for key in PRESETS[preset]} == PRESETS[preset]
    assert (config.model.vae, config.model.absolute_positions, config.model.block_layout) == (
        "tiny-random",
        False,
        None,
    )
    assert (config.data.text_dim, config.data.synthetic_vae) == (PRESETS[preset]["text_dim"], "tiny-random")
    assert config.model.sparse_ratio == 1 and config.train.steps == 600  # keys no preset decides are kept


def test_keys_beside_the_preset_on_the_same_layer_win():
    """Dimensions set on the command line next to model.preset override the preset; in a file, a preset and
    explicit fields combine the same way, and an override that names no preset keeps the file's sizes."""
    config = load_job_config(EXAMPLE, ["model.preset=wan-1.3b", "model.num_layers=2", "model.vae=tiny-block"])
    assert (config.model.dim, config.model.num_layers, config.model.vae) == (1536, 2, "tiny-block")
    kept = load_job_config(EXAMPLE, ["model.sparse_ratio=2"])
    assert (kept.model.dim, kept.model.ffn_dim, kept.model.vae) == (128, 256, "tiny-block")


def test_preset_switch_against_a_pinned_data_key_names_both(tmp_path):
    """A file that pins data.text_dim for its own model, switched to another preset on the command line, is
    refused with both keys and the way out named."""
    path = tmp_path / "pinned.yaml"
    path.write_text("model: {preset: wan-1.3b}\ndata: {text_dim: 4096}\n")
    assert load_job_config(str(path)).model.text_dim == 4096
    with pytest.raises(
        ConfigError, match="data.text_dim=4096 does not match model.text_dim=32; leave data.text_dim out"
    ):
        load_job_config(str(path), ["model.preset=tiny"])


def test_hybrid_block_layout_is_dual_end():
    """With sparse_ratio 2, wan-14b keeps 4 full blocks at each end and alternates token/group between."""
    kinds = from_dict(ModelConfig, {"preset": "wan-14b", "sparse_ratio": 2}, "model").block_kinds()
    assert kinds[:4] == ["full"] * 4 and kinds[-4:] == ["full"] * 4
    assert kinds[4:36] == ["token", "group"] * 16
    assert from_dict(ModelConfig, {"preset": "wan-14b"}, "model").block_kinds() == ["full"] * 40


def test_defaults_build_without_a_file():
    """A JobConfig can be built from overrides alone (the packaged defaults are consistent)."""
    assert isinstance(from_dict(JobConfig, {}), JobConfig)


def test_docs_preset_table_matches_the_presets():
    """docs/training.md's table of presets shows the dimensions model.preset fills."""
    text = open("docs/training.md", encoding="utf-8").read()
    header, _, *rows = [
        line
        for line in text.splitlines()
        if line.startswith("| `model.preset`")
        or line.startswith("|---|---|---|---|---|---|---|---|")
        or line.startswith("| `tiny`")
        or line.startswith("| `wan-")
    ]
    keys = [cell.strip(" `") for cell in header.strip("|").split("|")][1:]
    table = {}
    for row in rows:
        cells = [cell.strip(" `") for cell in row.strip("|").split("|")]
        table[cells[0]] = dict(zip(keys, map(int, cells[1:])))
    assert table == PRESETS


@pytest.mark.parametrize("name", ["tiny_t2v.yaml", "grpo_tiny.yaml"])
def test_packaged_default_configs_are_the_examples(name):
    """osp_megatron/configs/ holds links to examples/, so the default a job loads and the example a user reads
    are one file (a wheel build copies the linked content in as package data)."""
    packaged = Path(str(resources.files("osp_megatron") / "configs" / name))
    example = Path("examples") / name
    assert packaged.is_symlink() and packaged.samefile(example)
