"""Tests of the webdataset loader: batch layout, data-parallel disjointness, determinism, exact resume, errors.

The shared set has 50 samples in shards of 8, so rank slices and epochs end in the middle of shards.
"""

import shutil

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.data import WebDatasetLoader, build_data_loader


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def _keys(batches):
    return [key for batch in batches for key in batch["keys"]]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        for field in ("latents", "text_states", "text_lengths"):
            assert torch.equal(a[field], b[field])


def test_batch_layout_and_zero_padded_text(shard_dir, make_config):
    """A micro-batch holds latents [b,C,T,H,W], text states [b,text_len,D] zero after each length, and captions."""
    batch = next(WebDatasetLoader(make_config(shard_dir), micro_batch_size=3))
    assert batch["latents"].shape == (3, 16, 2, 4, 6) and batch["latents"].dtype == torch.float32
    assert batch["text_states"].shape == (3, 32, 16)
    assert batch["text_lengths"].dtype == torch.long and len(batch["captions"]) == 3
    for states, length in zip(batch["text_states"], batch["text_lengths"]):
        assert states[length:].abs().sum() == 0 and states[length - 1].abs().sum() > 0


def test_data_parallel_ranks_see_disjoint_samples(shard_dir, make_config):
    """Over one epoch, three DP ranks get equally many batches and no sample twice."""
    config = make_config(shard_dir)
    per_rank = []
    for rank in range(3):
        loader = WebDatasetLoader(config, micro_batch_size=4, dp_rank=rank, dp_size=3, seed=7)
        assert loader.batches_per_epoch == 4  # 50 // 3 = 16 samples per rank
        per_rank.append(_keys(_take(loader, loader.batches_per_epoch)))
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples_consumed"] == 0
    all_keys = [key for keys in per_rank for key in keys]
    assert len(all_keys) == 48 and len(set(all_keys)) == 48


def test_order_is_a_function_of_seed_and_epoch(shard_dir, make_config):
    """Two loaders with one seed agree batch for batch; another seed or the next epoch reorders the data."""
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


@pytest.mark.parametrize("consumed_batches", [3, 6, 7], ids=["mid-epoch", "at-epoch-end", "next-epoch"])
def test_resume_yields_exactly_the_batches_that_would_have_come_next(shard_dir, make_config, consumed_batches):
    """A fresh loader given state_dict() continues with the same batches, also across the epoch boundary."""
    config = make_config(shard_dir)
    reference = WebDatasetLoader(config, 4, dp_rank=1, dp_size=2, seed=11)  # 25 samples -> 6 batches per epoch
    _take(reference, consumed_batches)
    state = reference.state_dict()
    resumed = WebDatasetLoader(config, 4, dp_rank=1, dp_size=2, seed=11)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(reference, 8), _take(resumed, 8))


def test_worker_processes_give_the_same_stream_and_resume(shard_dir, make_config):
    """Reading with two worker processes yields exactly the single-process batches, before and after a resume."""
    single = _take(WebDatasetLoader(make_config(shard_dir), 3, seed=4), 12)
    workers = WebDatasetLoader(make_config(shard_dir, num_workers=2), 3, seed=4)
    _assert_same_batches(single[:5], _take(workers, 5))
    state = workers.state_dict()
    workers.close()
    resumed = WebDatasetLoader(make_config(shard_dir, num_workers=2), 3, seed=4)
    resumed.load_state_dict(state)
    _assert_same_batches(single[5:], _take(resumed, 7))
    resumed.close()


def test_changed_batch_size_resumes_at_the_same_sample(shard_dir, make_config):
    """The position is counted in samples, so a new micro-batch size continues where the old one stopped."""
    config = make_config(shard_dir)
    old = WebDatasetLoader(config, 2, seed=0)
    _take(old, 3)
    expected = _keys(_take(old, 2))
    new = WebDatasetLoader(config, 4, seed=0)
    new.load_state_dict({"epoch": 0, "samples_consumed": 6, "seed": 0})
    assert _keys(_take(new, 1)) == expected


def test_changed_data_parallel_size_restarts_at_the_next_epoch(shard_dir, make_config):
    """A mid-epoch state from another DP size has no exact counterpart, so the next epoch starts (with a warning)."""
    loader = WebDatasetLoader(make_config(shard_dir), 2, dp_size=2)
    with pytest.warns(UserWarning, match="next epoch|start of epoch"):
        loader.load_state_dict({"epoch": 2, "samples_consumed": 4, "dp_size": 4, "seed": 0})
    assert loader.state_dict()["epoch"] == 3 and loader.state_dict()["samples_consumed"] == 0


def test_shape_mismatch_names_shard_key_and_shapes(shard_dir, make_config):
    """A latent of another shape is reported with its shard, sample key, and expected vs found shape."""
    loader = WebDatasetLoader(make_config(shard_dir, latent_frames=3, shuffle=False), 2)
    with pytest.raises(ConfigError, match=r"shard-000000\.tar.*sample00000000.*\(16, 2, 4, 6\).*\(16, 3, 4, 6\)"):
        next(loader)


def test_text_dim_mismatch_names_the_shard(shard_dir, make_config):
    """Text states of another width are reported with the shard and the expected data.text_dim."""
    loader = WebDatasetLoader(make_config(shard_dir, text_dim=8, shuffle=False), 2)
    with pytest.raises(ConfigError, match=r"shard-000000\.tar.*text\.npy.*text_dim=8"):
        next(loader)


def test_truncated_shard_is_reported_by_name(shard_dir, make_config, tmp_path):
    """A shard cut short raises ConfigError naming that shard."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    victim = copy / "shard-000000.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    loader = WebDatasetLoader(make_config(copy, shuffle=False), 8)
    with pytest.raises(ConfigError, match=r"shard-000000\.tar"):
        next(loader)


def test_garbage_shard_is_reported_by_name(shard_dir, make_config, tmp_path):
    """A file that is not a tar at all raises ConfigError naming the shard."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "shard-000001.tar").write_bytes(b"not a tar file" * 100)
    loader = WebDatasetLoader(make_config(copy, shuffle=False), 10)
    with pytest.raises(ConfigError, match=r"shard-000001\.tar"):
        next(loader)


def test_shard_globs_without_index_are_scanned(shard_dir, make_config, tmp_path):
    """A list of globs over shards with no index.json is counted by scanning and read like the folder."""
    copy = tmp_path / "noindex"
    shutil.copytree(shard_dir, copy)
    (copy / "index.json").unlink()
    config = make_config([str(copy / "shard-00000[0-2].tar"), str(copy / "shard-00000[3-6].tar")])
    loader = WebDatasetLoader(config, 5, seed=1)
    assert loader.num_samples == 50
    _assert_same_batches(_take(WebDatasetLoader(make_config(shard_dir), 5, seed=1), 3), _take(loader, 3))


def test_missing_data_is_a_config_error(tmp_path, make_config):
    """A glob that matches nothing, or a folder without shards, names the path."""
    with pytest.raises(ConfigError, match="matches no file"):
        WebDatasetLoader(make_config([str(tmp_path / "*.tar")]), 1)
    with pytest.raises(ConfigError, match="no .tar shards"):
        WebDatasetLoader(make_config(tmp_path), 1)


def test_too_little_data_for_the_batch_is_a_config_error(shard_dir, make_config):
    """Fewer samples than dp_size x micro_batch_size is refused with both numbers in the message."""
    with pytest.raises(ConfigError, match="50 samples.*dp_size \\(8\\).*micro_batch_size \\(8\\)"):
        WebDatasetLoader(make_config(shard_dir), 8, dp_rank=0, dp_size=8)


def test_build_data_loader_generates_synthetic_data_once(tmp_path, make_config):
    """With synthetic: true the loader writes the data set on first use and reads it."""
    config = make_config(tmp_path / "gen", synthetic=True, synthetic_num_samples=6, synthetic_samples_per_shard=4)
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
    with pytest.raises(ConfigError, match=r"data\.shuffle"):
        make_config("x", shuffle="yes").validate()
