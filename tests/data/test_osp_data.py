"""Tests of `osp-data`: build from real MP4s with bad files, encode on two ranks, resume of both, inspect, bench.

The session fixtures (conftest.py) build and encode once; tests that damage or resume work on copies.
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
import webdataset

from osp_data import build as build_module
from osp_data.cli import main
from osp_data.encode import encode_dataset
from osp_megatron.config.errors import ConfigError
from osp_megatron.data.config import DataConfig
from osp_megatron.data.loader import WebDatasetLoader
from osp_megatron.data.shards import iter_raw_samples, read_index
from osp_megatron.data.video import decode_clip

# 5 good videos of 2 s at 12 fps -> 2 clips (max_clips_per_video) of 5 frames at 8 fps; see conftest.raw_videos.
CLIPS_PER_BUCKET = {"64x64": 2, "64x96": 4, "96x64": 4}
LATENT_SHAPES = {"64x64": [16, 2, 8, 8], "64x96": [16, 2, 8, 12], "96x64": [16, 2, 12, 8]}
BAD_INPUT = {"absent video": 1, "missing caption": 1, "too short": 1, "unreadable video": 2}


def _shard_keys(folder):
    index = read_index(str(folder))
    return {e["name"]: [raw["__key__"] for raw in iter_raw_samples(str(folder / e["name"]))] for e in index["shards"]}


def _latents(shard):
    return {
        raw["__key__"]: np.load(io.BytesIO(raw["latent.npy"])).astype(np.float32)
        for raw in iter_raw_samples(str(shard))
    }


def _encode(clips, output):
    return encode_dataset(str(clips), str(output), text_dim=32, text_len=32, batch_size=2, progress=False)


def test_build_writes_bucketed_clips_and_counts_every_bad_input(clip_dir):
    """2 clips per good video in one-bucket shards; corrupt, zero-byte, short, uncaptioned and absent are counted."""
    report = json.loads((clip_dir / "build_report.json").read_text())
    assert report["clips_per_bucket"] == CLIPS_PER_BUCKET and report["videos_with_clips"] == 5
    assert report["problems"]["counts"] == BAD_INPUT
    assert {item["item"] for item in report["problems"]["items"]} >= {
        "corrupt.mp4",
        "empty.mp4",
        "short.mp4",
        "uncaptioned.mp4",
    }
    index = read_index(str(clip_dir))
    assert index["format"] == "osp-clips-v1" and len(index["shards"]) > 3  # small shards: buckets span several
    for entry in index["shards"]:
        height, width = (int(s) for s in entry["bucket"].split("x"))
        samples = list(iter_raw_samples(str(clip_dir / entry["name"])))
        assert len(samples) == entry["num_samples"] > 0
        for raw in samples:
            assert decode_clip(raw["mp4"]).shape == (5, height, width, 3)
            metadata = json.loads(raw["json"])
            assert metadata["bucket"] == entry["bucket"] and raw["txt"].decode() == metadata["caption"]
    assert not [name for name in os.listdir(clip_dir) if name.endswith(".tmp")]


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_shards(raw_videos, clip_dir, clip_builder, tmp_path, monkeypatch):
    """A build that dies after some videos continues on rerun (here with 2 decoding processes) and ends with the
    shards of an uninterrupted one."""

    real = build_module.process_video
    calls = []

    def dies_at_the_fourth_video(job):
        calls.append(job)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(job)

    monkeypatch.setattr(build_module, "process_video", dies_at_the_fourth_video)
    output = tmp_path / "clips"
    with pytest.raises(KeyboardInterrupt):
        clip_builder(raw_videos, output)
    assert not (output / "index.json").exists()
    journaled = [json.loads(line) for line in (output / "build_journal.jsonl").read_text().splitlines()]
    assert journaled, "some shards were finished before the kill"
    monkeypatch.setattr(build_module, "process_video", real)
    report = clip_builder(raw_videos, output, workers=2)  # decoding processes write the same shards
    assert report["clips_per_bucket"] == CLIPS_PER_BUCKET and report["problems"]["counts"] == BAD_INPUT
    assert 0 < report["clips_this_run"] < 10
    assert _shard_keys(output) == _shard_keys(clip_dir)


def test_build_refuses_other_settings_or_other_data(raw_videos, clip_dir, clip_builder, tmp_path):
    """Rerunning into a build with other settings, or into a folder of other data, names the problem."""

    copy = tmp_path / "copy"
    shutil.copytree(clip_dir, copy)
    with pytest.raises(ConfigError, match="other settings \\(fps\\)"):
        clip_builder(raw_videos, copy, fps=4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        clip_builder(raw_videos, tmp_path / "other")
    with pytest.raises(ConfigError, match="--frames must be 1 \\+ a multiple"):
        clip_builder(raw_videos, tmp_path / "new", frames=8)


def test_encode_writes_the_shards_osp_train_reads(latent_dir):
    """Latents per bucket with the VAE's shapes, float16 on disk; the index lists offsets; the loader reads all."""
    index = read_index(str(latent_dir))
    assert index["format"] == "osp-latents-v1" and index["text_dim"] == 32
    assert index["samples_per_bucket"] == CLIPS_PER_BUCKET
    for entry in index["shards"]:
        assert entry["latent_shape"] == LATENT_SHAPES[entry["bucket"]]
        assert len(entry["offsets"]) == entry["num_samples"] + 1
    raw = next(iter_raw_samples(str(latent_dir / index["shards"][0]["name"])))
    assert np.load(io.BytesIO(raw["latent.npy"])).dtype == np.float16
    report = json.loads((latent_dir / "encode_report.json").read_text())
    assert report["samples"] == 10 and report["problems"]["counts"] == {}
    config = DataConfig(path=str(latent_dir), text_dim=32, text_len=32)
    loader = WebDatasetLoader(config, 1, seed=0, global_batch_size=2)
    keys = [key for _ in range(10) for key in next(loader)["keys"]]
    assert len(set(keys)) == 10


@pytest.mark.slow
def test_encode_on_two_ranks_writes_the_shards_of_one(clip_dir, latent_dir, encode_on_ranks, tmp_path):
    """Two gloo ranks, each encoding every other shard, write the index and the latents one rank writes."""
    folder = tmp_path / "latents"
    encode_on_ranks(clip_dir, folder, 2)
    one, two = read_index(str(latent_dir)), read_index(str(folder))
    assert two["shards"] == one["shards"] and two["samples_per_bucket"] == one["samples_per_bucket"]
    for entry in one["shards"]:
        expected, written = _latents(latent_dir / entry["name"]), _latents(folder / entry["name"])
        assert written.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(written[key], expected[key], atol=2e-3, rtol=2e-3)


def test_killed_encode_resumes_only_unfinished_shards(clip_dir, latent_dir, tmp_path):
    """A shard whose encode was cut (only its hidden temporary file exists) is redone, identical; others stay."""
    copy = tmp_path / "latents"
    shutil.copytree(latent_dir, copy)
    victim = read_index(str(copy))["shards"][1]["name"]
    original = _latents(copy / victim)
    (copy / victim).rename(copy / f".{victim}.tmp")
    (copy / ".encode" / f"{victim}.json").unlink()
    (copy / "index.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")}
    report = _encode(clip_dir, copy)
    assert report["clips_this_run"] == read_index(str(latent_dir))["shards"][1]["num_samples"]
    redone = _latents(copy / victim)
    assert redone.keys() == original.keys()  # the same latents as the first encode (float16 on disk)
    for key in original:
        np.testing.assert_allclose(redone[key], original[key], atol=2e-3, rtol=2e-3)
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar") if p.name != victim} == kept
    assert not list(copy.glob(".*.tmp"))
    assert [(e["name"], e["num_samples"]) for e in read_index(str(copy))["shards"]] == [
        (e["name"], e["num_samples"]) for e in read_index(str(latent_dir))["shards"]
    ]


def test_encode_skips_bad_clips_and_writes_no_empty_shard(clip_dir, tmp_path):
    """An undecodable clip is skipped and counted; a shard whose clips are all bad leaves no output shard."""
    copy = tmp_path / "clips"
    shutil.copytree(clip_dir, copy)
    index = read_index(str(copy))
    index["shards"] = index["shards"][:2]  # only these two are encoded
    (copy / "index.json").write_text(json.dumps(index))
    damaged, emptied = index["shards"][0]["name"], index["shards"][1]["name"]
    for name, how_many in ((damaged, 1), (emptied, None)):
        samples = list(iter_raw_samples(str(copy / name)))
        with webdataset.TarWriter(str(copy / name)) as writer:
            for i, raw in enumerate(samples):
                if how_many is None or i < how_many:
                    raw = dict(raw, mp4=b"garbage")
                writer.write({k: v for k, v in raw.items() if k in ("__key__", "mp4", "txt", "json")})
    report = _encode(copy, tmp_path / "latents")
    bad = index["shards"][1]["num_samples"] + 1
    assert report["problems"]["counts"] == {"bad clip": bad}
    assert report["samples"] == index["shards"][0]["num_samples"] - 1
    assert not (tmp_path / "latents" / emptied).exists()
    assert emptied not in [e["name"] for e in read_index(str(tmp_path / "latents"))["shards"]]


def test_encode_refuses_input_that_is_not_a_build(tmp_path, shard_dir):
    """encode names the expected input format when given another folder."""
    with pytest.raises(ConfigError, match="osp-clips-v1"):
        _encode(shard_dir, tmp_path / "out")


def test_inspect_and_bench_report_on_the_shards(latent_dir, clip_dir, tmp_path, capsys):
    """inspect prints buckets, counts, shapes and dtypes; --check finds a damaged sample; bench measures."""
    assert main(["inspect", str(latent_dir), "--check", "--json", str(tmp_path / "summary.json")]) == 0
    out = capsys.readouterr().out
    assert "64x96" in out and "latent.npy [16, 2, 8, 12] float16" in out and "checked every sample: 0 bad" in out
    assert json.loads((tmp_path / "summary.json").read_text())["buckets"]["64x96"]["samples"] == 4
    assert main(["inspect", str(clip_dir)]) == 0
    assert "unreadable video': 2" in capsys.readouterr().out
    copy = tmp_path / "damaged"
    shutil.copytree(latent_dir, copy)
    shard = copy / read_index(str(copy))["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    start = data.find(b"\x93NUMPY")
    data[start : start + 6] = b"broken"
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(copy), "--check"]) == 0
    assert "checked every sample: 1 bad" in capsys.readouterr().out
    assert (
        main(["bench", str(latent_dir), "--batches", "6", "--num-workers", "0", "--json", str(tmp_path / "bench.json")])
        == 0
    )
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["samples"] == 6 and result["samples_per_s"] > 0 and result["mb_per_s"] > 0


@pytest.mark.parametrize("command", ["build", "encode", "inspect", "bench"])
def test_every_subcommand_has_help_with_examples(command, capsys):
    """`osp-data CMD --help` exits 0 and shows examples."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"osp-data {command}" in text


def test_argument_errors_exit_with_status_2(tmp_path, capsys):
    """A missing caption file is reported as an error naming the flag, exit status 2."""
    (tmp_path / "videos").mkdir()
    assert (
        main(
            [
                "build",
                "--videos",
                str(tmp_path / "videos"),
                "--captions",
                str(tmp_path / "none.jsonl"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--captions" in capsys.readouterr().err


def test_build_with_nothing_usable_fails_and_writes_no_index(tmp_path, capsys):
    """Only a zero-byte and a corrupt video: build says it failed, exits 1, leaves its report but no index.json
    (encode then refuses the folder), and tells the empty file apart from the corrupt one, one line each."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (videos / "captions.jsonl").write_text(
        '{"path": "empty.mp4", "caption": "a"}\n{"path": "corrupt.mp4", "caption": "b"}\n'
    )
    output = tmp_path / "clips"
    assert (
        main(
            [
                "build",
                "--videos",
                str(videos),
                "--captions",
                str(videos / "captions.jsonl"),
                "--output",
                str(output),
                "--frames",
                "5",
                "--buckets",
                "64x64",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "osp-data build: warning: skipping empty.mp4: unreadable video: is an empty file (0 bytes)\n" in err
    assert "osp-data build: warning: skipping corrupt.mp4: unreadable video: cannot be opened" in err
    assert "osp-data build: failed: no clip from the 2 captioned video(s)" in err and "no index.json written" in err
    assert (output / "build_report.json").is_file() and not (output / "index.json").exists()
    assert main(["encode", "--input", str(output), "--output", str(tmp_path / "latents"), "--no-progress"]) == 2
    assert "holds no `osp-data build` output" in capsys.readouterr().err


def test_empty_caption_file_is_its_own_usage_error(tmp_path, capsys):
    """A zero-byte caption file is named as empty (exit 2), not read as a file without rows."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "captions.jsonl").write_bytes(b"")
    assert (
        main(
            [
                "build",
                "--videos",
                str(tmp_path / "videos"),
                "--captions",
                str(tmp_path / "captions.jsonl"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "captions.jsonl' is an empty file" in capsys.readouterr().err


def test_encode_with_no_usable_clip_fails_and_writes_no_index(clip_dir, tmp_path, capsys):
    """Every clip undecodable: encode says it failed, exits 1 and writes no index.json."""
    copy = tmp_path / "clips"
    shutil.copytree(clip_dir, copy)
    index = read_index(str(copy))
    index["shards"] = index["shards"][:1]
    (copy / "index.json").write_text(json.dumps(index))
    name = index["shards"][0]["name"]
    samples = list(iter_raw_samples(str(copy / name)))
    with webdataset.TarWriter(str(copy / name)) as writer:
        for raw in samples:
            writer.write({"__key__": raw["__key__"], "mp4": b"garbage", "txt": raw["txt"], "json": raw["json"]})
    output = tmp_path / "latents"
    assert (
        main(
            [
                "encode",
                "--input",
                str(copy),
                "--output",
                str(output),
                "--text-dim",
                "32",
                "--text-len",
                "32",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "osp-data encode: failed: no sample encoded" in capsys.readouterr().err
    assert (output / "encode_report.json").is_file() and not (output / "index.json").exists()


def test_bench_reads_the_training_config_with_its_overrides(latent_dir, tmp_path, capsys):
    """`osp-data bench --config FILE key=value ...` reads the config's data.path and batch sizes after the
    overrides, as osp-train would; too large a batch names every bucket's count; warnings are one plain line."""
    config = tmp_path / "train.yaml"
    config.write_text(f"train: {{micro_batch_size: 1, global_batch_size: 8}}\ndata: {{path: {latent_dir}}}\n")
    result_file = tmp_path / "bench.json"
    common = ["--batches", "4", "--json", str(result_file)]
    assert main(["bench", "--config", str(config), *common]) == 2
    assert "(samples per bucket: 64x64: 2 of 8, 64x96: 4 of 8, 96x64: 4 of 8)" in capsys.readouterr().err
    assert main(["bench", "--config", str(config), "train.global_batch_size=4", "data.num_workers=0", *common]) == 0
    captured = capsys.readouterr()
    assert "global batch 4" in captured.out and "UserWarning" not in captured.err
    assert (
        "osp-data bench: warning: data source 0: bucket 64x64 holds 2 samples, fewer than its global batch of "
        "4; its samples are not used (every global batch is one bucket)\n"
    ) in captured.err
    assert json.loads(result_file.read_text())["samples"] == 4
    # FOLDER first, overrides after the options: the folder replaces data.path
    assert main(["bench", str(latent_dir), "--config", str(config), "train.global_batch_size=2", *common]) == 0
    assert main(["bench", "train.global_batch_size=2"]) == 2
    assert "name it with --config" in capsys.readouterr().err
