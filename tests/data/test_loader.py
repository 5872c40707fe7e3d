"""Tests of the training loader: batch contents, layout-free order, buckets, mixing, resume, workers, bad samples.

Uses the session synthetic shard set and small bucketed latent shards written by conftest.write_latent_shards.
"""

import json
import shutil
import warnings

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.config import BucketBatchSize, DataSource
from osp_megatron.data.loader import WebDatasetLoader, build_data_loader

SHAPE_A, SHAPE_B = (16, 2, 4, 6), (16, 2, 6, 4)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _keys(batches):
    return [key for batch in batches for key in batch["keys"]]


def _assert_same_batches(a, b):
    assert _keys(a) == _keys(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["latents"], y["latents"])
        torch.testing.assert_close(x["text_states"], y["text_states"])
        assert torch.equal(x["sample_indices"], y["sample_indices"])


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory, latent_shard_writer):
    """Two buckets (landscape 24 samples, portrait 16) in shards of 4."""
    return latent_shard_writer(tmp_path_factory.mktemp("buckets"), {SHAPE_A: 24, SHAPE_B: 16})


def test_batches_have_documented_fields_and_shapes(shard_dir, make_config):
    """latents [b,C,T,H,W] float32, text_states zero-padded past text_lengths, int64 global sample indices."""
    batch = next(WebDatasetLoader(make_config(shard_dir), micro_batch_size=3))
    assert batch["latents"].shape == (3, 16, 2, 4, 6) and batch["latents"].dtype == torch.float32
    assert batch["text_states"].shape == (3, 32, 16)
    assert batch["text_lengths"].dtype == torch.long and len(batch["captions"]) == 3
    assert batch["sample_indices"].tolist() == [0, 1, 2] and batch["sample_indices"].dtype == torch.int64
    assert batch["bad_samples"] == 0 and batch["bytes_read"] > 3 * 16 * 2 * 4 * 6 * 4
    for states, length in zip(batch["text_states"], batch["text_lengths"]):
        assert states[length:].abs().sum() == 0 and states[length - 1].abs().sum() > 0


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: reader processes
def test_every_sample_of_an_epoch_is_seen_once_across_ranks_and_workers(bucket_dir, make_config, num_workers):
    """Two ranks, each with `num_workers` readers, together read each sample of an epoch exactly once."""
    config = make_config(bucket_dir, num_workers=num_workers)
    loaders = [WebDatasetLoader(config, 2, rank, 2, seed=5, global_batch_size=8) for rank in range(2)]
    batches_per_epoch = loaders[0].stream.plans[0].batches_per_epoch  # 3 + 2 global batches of 8
    keys, indices = [], []
    for _ in range(batches_per_epoch * loaders[0].accumulation):
        for loader in loaders:
            batch = next(loader)
            keys += batch["keys"]
            indices += batch["sample_indices"].tolist()
    for loader in loaders:
        loader.close()
    assert len(keys) == 40 and len(set(keys)) == 40
    assert sorted(indices) == list(range(40))


def test_order_is_layout_free(bucket_dir, make_config):
    """1 rank x accumulation 2 and 2 ranks x accumulation 1 give each global batch the same samples and indices."""
    config = make_config(bucket_dir)
    one = WebDatasetLoader(config, 2, 0, 1, seed=3, global_batch_size=4)
    two = [WebDatasetLoader(config, 2, rank, 2, seed=3, global_batch_size=4) for rank in range(2)]
    assert one.accumulation == 2 and two[0].accumulation == 1
    for _ in range(12):  # global batches
        single = _take(one, 2)
        split = [next(loader) for loader in two]
        _assert_same_batches(single, split)
        assert one.state_dict()["global_samples"] == two[1].state_dict()["global_samples"]


def test_each_global_batch_is_one_bucket_and_buckets_share_the_epoch(bucket_dir, make_config):
    """Every micro-batch has one shape; over an epoch both buckets appear in proportion to their samples."""
    loader = WebDatasetLoader(make_config(bucket_dir), 2, seed=1, global_batch_size=4)
    batches = _take(loader, 20)  # one epoch: 10 global batches of 2 micro-batches
    for first, second in zip(batches[::2], batches[1::2]):
        assert first["latents"].shape == second["latents"].shape
    shapes = [tuple(b["latents"].shape[1:]) for b in batches]
    assert shapes.count(SHAPE_A) == 12 and shapes.count(SHAPE_B) == 8
    assert {b["bucket"] for b in batches} == {"2x4x6", "2x6x4"}


def test_per_bucket_batch_sizes_and_token_budget(bucket_dir, make_config):
    """data.bucket_batch_sizes sets one bucket's micro-batch; tokens_per_micro_batch divides by its tokens."""
    config = make_config(bucket_dir, bucket_batch_sizes=[BucketBatchSize("2x6x4", 4)])
    sizes = {b["bucket"]: len(b["keys"]) for b in _take(WebDatasetLoader(config, 1, seed=0), 20)}
    assert sizes == {"2x4x6": 1, "2x6x4": 4}
    budget = make_config(bucket_dir, tokens_per_micro_batch=24)  # 2 x 2 x 3 = 12 tokens per sample after patch
    loader = WebDatasetLoader(budget, 1, seed=0, patch_size=(1, 2, 2))
    assert {b.micro_batch_size for b in loader.buckets.values()} == {2}


def test_mixing_follows_the_weights(tmp_path, make_config, latent_shard_writer):
    """Two sources mixed 3:1 give shares of samples within 2 % over a few hundred samples."""
    first = latent_shard_writer(tmp_path / "a", {SHAPE_A: 12}, prefix="a")
    second = latent_shard_writer(tmp_path / "b", {SHAPE_A: 40, SHAPE_B: 8}, prefix="b")
    config = make_config("unused", sources=[DataSource(str(first), 3.0), DataSource(str(second), 1.0)])
    loader = WebDatasetLoader(config, 2, seed=0)
    keys = _keys(_take(loader, 200))
    share = sum(key.startswith("a") for key in keys) / len(keys)
    assert abs(share - 0.75) < 0.02
    assert loader.state_dict()["sources"][0][0] >= 20  # the small source went round many epochs


def test_order_depends_on_seed_and_epoch(shard_dir, make_config):
    """Two loaders with one seed agree; another seed, or the next epoch, orders the samples differently."""
    config = make_config(shard_dir)
    first = _take(WebDatasetLoader(config, 5, seed=1), 20)
    _assert_same_batches(first, _take(WebDatasetLoader(config, 5, seed=1), 20))
    assert _keys(first) != _keys(_take(WebDatasetLoader(config, 5, seed=2), 20))
    epoch0, epoch1 = _keys(first[:10]), _keys(first[10:])
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # 50 samples, 10 batches of 5 per epoch


def test_without_shuffle_samples_come_in_file_order(shard_dir, make_config):
    """shuffle: false reads shards and samples in the order they were written."""
    keys = _keys(_take(WebDatasetLoader(make_config(shard_dir, shuffle=False), 10), 5))
    assert keys == [f"sample{i:08d}" for i in range(50)]


@pytest.mark.parametrize("consumed", [3, 9, 23], ids=["mid-epoch", "mid-step", "next-epoch"])
def test_resume_continues_with_the_next_batches(bucket_dir, make_config, consumed):
    """A fresh loader given state_dict() continues exactly, also inside a global batch and across epochs."""
    config = make_config(bucket_dir)
    reference = WebDatasetLoader(config, 2, dp_rank=1, dp_size=2, seed=11, global_batch_size=8)
    _take(reference, consumed)
    resumed = WebDatasetLoader(config, 2, dp_rank=1, dp_size=2, seed=11, global_batch_size=8)
    resumed.load_state_dict(reference.state_dict())
    _assert_same_batches(_take(reference, 8), _take(resumed, 8))


def test_resume_on_another_layout_continues_the_global_stream(bucket_dir, make_config):
    """A position saved by 2 ranks x 1 resumes on 1 rank x 2 with the next global batches, sample for sample."""
    config = make_config(bucket_dir)
    two = [WebDatasetLoader(config, 2, rank, 2, seed=4, global_batch_size=4) for rank in range(2)]
    for _ in range(5):
        for loader in two:
            next(loader)
    one = WebDatasetLoader(config, 2, 0, 1, seed=4, global_batch_size=4)
    one.load_state_dict(two[0].state_dict())
    for _ in range(4):
        _assert_same_batches(_take(one, 2), [next(loader) for loader in two])


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume(bucket_dir, make_config):
    """Two worker processes yield exactly the single-process batches, before and after a resume."""
    single = _take(WebDatasetLoader(make_config(bucket_dir), 3, seed=4), 12)
    workers = WebDatasetLoader(make_config(bucket_dir, num_workers=2), 3, seed=4)
    _assert_same_batches(single[:5], _take(workers, 5))
    state = workers.state_dict()
    workers.close()
    resumed = WebDatasetLoader(make_config(bucket_dir, num_workers=2), 3, seed=4)
    resumed.load_state_dict(state)
    _assert_same_batches(single[5:], _take(resumed, 7))
    resumed.close()


def test_state_of_the_earlier_loader_falls_back_to_the_next_epoch(shard_dir, make_config):
    """A per-rank state dict of the earlier format resumes at the next epoch, with a warning."""
    loader = WebDatasetLoader(make_config(shard_dir), 2, dp_size=2, global_batch_size=4)
    with pytest.warns(UserWarning, match="earlier version.*epoch 3"):
        loader.load_state_dict({"epoch": 2, "samples_consumed": 4, "dp_size": 4, "seed": 0})
    assert loader.state_dict()["sources"] == [[3, 0, 0]] and loader.state_dict()["global_samples"] == 3 * 48


def test_bad_samples_are_replaced_counted_and_warned(bucket_dir, make_config, tmp_path):
    """A damaged sample is replaced by the next one of its bucket; the batch counts it; a truncated shard too."""
    copy = tmp_path / "copy"
    shutil.copytree(bucket_dir, copy)
    victim = sorted(copy.glob("s-2x4x6-0000.tar"))[0]
    data = bytearray(victim.read_bytes())
    start = data.find(b"\x93NUMPY")
    data[start : start + 6] = b"broken"  # the first sample's latent.npy is no longer a .npy
    victim.write_bytes(bytes(data))
    truncated = copy / "s-2x6x4-0000.tar"
    second_sample = json.loads((copy / "index.json").read_text())["shards"][6]["offsets"][1]
    truncated.write_bytes(truncated.read_bytes()[: second_sample + 600])
    loader = WebDatasetLoader(make_config(copy, shuffle=False), 4, seed=0)
    with pytest.warns(UserWarning, match="skipping a bad sample"):
        batches = _take(loader, 10)  # one epoch
    assert sum(b["bad_samples"] for b in batches) == 1 + 3  # the truncated shard keeps its first sample
    assert all(len(b["keys"]) == 4 for b in batches)
    first = batches[0]
    assert "s00000" not in first["keys"] and first["bad_samples"] == 1


def test_a_broken_bucket_is_an_error_naming_the_shard(bucket_dir, make_config, tmp_path):
    """When every candidate of a bucket is bad, the loader stops with a ConfigError naming a shard."""
    copy = tmp_path / "copy"
    shutil.copytree(bucket_dir, copy)
    for shard in copy.glob("*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    loader = WebDatasetLoader(make_config(copy, max_bad_in_a_row=3), 2)
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"bad samples in a row.*\.tar"):
        next(loader)


def test_shard_globs_without_index_are_scanned(shard_dir, make_config, tmp_path):
    """A list of globs over shards with no index.json is counted and shaped by scanning, and read the same."""
    copy = tmp_path / "noindex"
    shutil.copytree(shard_dir, copy)
    (copy / "index.json").unlink()
    config = make_config([str(copy / "shard-00000[0-2].tar"), str(copy / "shard-00000[3-6].tar")])
    loader = WebDatasetLoader(config, 5, seed=1)
    assert loader.num_samples == 50 and loader.latent_shapes == [(16, 2, 4, 6)]
    _assert_same_batches(_take(WebDatasetLoader(make_config(shard_dir), 5, seed=1), 3), _take(loader, 3))


def test_missing_data_is_a_config_error(tmp_path, make_config):
    """A glob that matches nothing, or a folder without shards, names the path."""
    with pytest.raises(ConfigError, match="matches no file"):
        WebDatasetLoader(make_config([str(tmp_path / "*.tar")]), 1)
    with pytest.raises(ConfigError, match="no .tar shards"):
        WebDatasetLoader(make_config(tmp_path), 1)


def test_too_little_data_for_a_global_batch_is_a_config_error(shard_dir, make_config):
    """A source whose buckets cannot fill one global batch is refused with every bucket's count against its
    global batch and the setting to lower, in one message (no warning per bucket before it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ConfigError,
            match=r"\(samples per bucket: 2x4x6: 50 of 64\).*lower "
            r"train.global_batch_size",
        ):
            WebDatasetLoader(make_config(shard_dir), 8, dp_rank=0, dp_size=8)


def test_a_bucket_smaller_than_its_global_batch_is_left_out_with_a_warning(bucket_dir, make_config):
    """With one bucket full and one not, the short one is named in a warning and never read."""
    with pytest.warns(UserWarning, match="bucket 2x6x4 holds 16 samples, fewer than its global batch of 20"):
        loader = WebDatasetLoader(make_config(bucket_dir), 2, seed=0, global_batch_size=20)
    assert {batch["bucket"] for batch in _take(loader, 10)} == {"2x4x6"}


def test_shards_encoded_for_another_text_encoder_are_refused_at_start(tmp_path, make_config, latent_shard_writer):
    """Text states wider than data.text_dim, or longer than data.text_len, per the shards' index: one error
    naming the source's key, both settings and the shards' value, before any sample is read."""
    wide = latent_shard_writer(tmp_path / "wide", {SHAPE_A: 4}, text_dim=4096, text_len=512)
    with pytest.raises(
        ConfigError,
        match=r"data.path '.*wide': its shards hold text states of width 4096 .*"
        r"data.text_dim is 16 \(it follows model.text_dim\).*--config",
    ):
        WebDatasetLoader(make_config(wide), 1)
    mixed = make_config("unused", sources=[DataSource(str(tmp_path / "wide"), 1.0)], text_dim=4096)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path .*up to 512 text tokens.*data.text_len is 32"):
        WebDatasetLoader(mixed, 1)


def test_batch_sizes_that_do_not_divide_are_config_errors(shard_dir, make_config):
    """global_batch_size must be micro_batch_size x dp_size x an integer."""
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x data-parallel size"):
        WebDatasetLoader(make_config(shard_dir), 2, dp_size=2, global_batch_size=6)


def test_synthetic_data_is_written_once_and_read(tmp_path, make_config):
    """With synthetic: true the job writes the data set on first use (ensure_synthetic_data) and the loader
    reads it; a second call leaves it untouched."""
    from osp_megatron.engine.data import ensure_synthetic_data

    config = make_config(tmp_path / "gen", synthetic=True, synthetic_num_samples=6, synthetic_samples_per_shard=4)
    ensure_synthetic_data(config)
    written = (tmp_path / "gen" / "index.json").stat().st_mtime_ns
    ensure_synthetic_data(config)
    assert (tmp_path / "gen" / "index.json").stat().st_mtime_ns == written
    batch = next(build_data_loader(config, 2))
    assert batch["latents"].shape == (2, 16, 2, 4, 6)
    assert (tmp_path / "gen" / "index.json").exists()


def test_config_validation_names_the_dotted_key(make_config):
    """Invalid fields raise ConfigError naming prefix.key."""
    with pytest.raises(ConfigError, match=r"data\.latent_height"):
        make_config("x", latent_height=0).validate()
    with pytest.raises(ConfigError, match=r"train_data\.num_workers"):
        make_config("x", num_workers=-1).validate(prefix="train_data")
    with pytest.raises(ConfigError, match=r"data\.path"):
        make_config(["a/*.tar"], synthetic=True).validate()
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight"):
        make_config("x", sources=[DataSource("a", 1.0), DataSource("b", 0.0)]).validate()
    with pytest.raises(ConfigError, match=r"data\.bucket_batch_sizes\[0\]\.micro_batch_size"):
        make_config("x", bucket_batch_sizes=[BucketBatchSize("64x64", 0)]).validate()
    with pytest.raises(ConfigError, match=r"data\.tokens_per_micro_batch"):
        make_config("x", tokens_per_micro_batch=-1).validate()
    with pytest.raises(ConfigError, match=r"data\.eval_path"):
        make_config("x", eval_path="").validate()


def test_sources_load_from_yaml_with_dotted_errors(tmp_path):
    """data.sources and data.bucket_batch_sizes come from YAML; a wrong key inside names its index."""
    from osp_megatron.engine.config import load_job_config

    path = tmp_path / "job.yaml"
    path.write_text(
        "data:\n  sources:\n    - {path: a, weight: 2}\n    - {path: [b/*.tar], weight: 1}\n"
        "  bucket_batch_sizes:\n    - {bucket: 480x832, micro_batch_size: 2}\n"
    )
    config = load_job_config(path).data
    assert config.source_list() == [("a", 2.0), (["b/*.tar"], 1.0)]
    assert config.bucket_batch_sizes[0].micro_batch_size == 2
    path.write_text("data:\n  sources:\n    - {path: a, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.wieght"):
        load_job_config(path)
