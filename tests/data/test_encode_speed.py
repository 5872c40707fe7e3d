"""Tests of the fast `osp-data encode`: prefetching in a background thread writes the shards a sequential run
writes and reports the same bad clips, errors on either side stop the job and the thread, the speed flags reach
the VAE, and the speed benchmark's tiny CPU mode runs."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import webdataset

from osp_data import encode as encode_module
from osp_data.cli import main
from osp_data.encode import Encoders, encode_dataset
from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import iter_raw_samples, read_index
from osp_megatron.models.vae import DEFAULT_CHUNK_FRAMES

ROOT = Path(__file__).resolve().parents[2]


def _encode(clips, output, **options):
    return encode_dataset(str(clips), str(output), text_dim=32, text_len=32, batch_size=2, progress=False, **options)


def _with_a_corrupt_clip(clip_dir, folder):
    """A copy of the clip shards whose first shard's second clip does not decode; returns that clip's name."""
    shutil.copytree(clip_dir, folder)
    name = read_index(str(folder))["shards"][0]["name"]
    samples = list(iter_raw_samples(str(folder / name)))
    with webdataset.TarWriter(str(folder / name)) as writer:
        for i, raw in enumerate(samples):
            raw = dict(raw, mp4=b"garbage") if i == 1 else raw
            writer.write({k: v for k, v in raw.items() if k in ("__key__", "mp4", "txt", "json")})
    return f"{name}/{samples[1]['__key__']}"


def _contents(folder):
    """Every latent shard's samples (each entry's bytes, in file order), the per-shard records and the index's
    shard list: all an encode writes except tar timestamps and timings."""
    index = read_index(str(folder))
    shards = {
        entry["name"]: [
            sorted((key, value) for key, value in raw.items() if key != "__url__")  # the shard's own path
            for raw in iter_raw_samples(str(folder / entry["name"]))
        ]
        for entry in index["shards"]
    }
    records = {path.name: json.loads(path.read_text()) for path in sorted((folder / ".encode").glob("*.tar.json"))}
    return shards, records, index["shards"]


def _prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == "osp-data-encode-prefetch"]


def test_prefetching_encode_writes_the_shards_of_a_sequential_one(clip_dir, tmp_path):
    """With prefetch on, every shard holds bit for bit the samples of a sequential encode, in the same order,
    with the same records and index; the corrupt clip is reported the same way in both."""
    clips = tmp_path / "clips"
    corrupt = _with_a_corrupt_clip(clip_dir, clips)
    sequential = _encode(clips, tmp_path / "sequential", prefetch=False)
    prefetched = _encode(clips, tmp_path / "prefetched", prefetch=True)
    assert _contents(tmp_path / "prefetched") == _contents(tmp_path / "sequential")
    for report in (sequential, prefetched):
        assert report["problems"]["counts"] == {"bad clip": 1}
        assert report["problems"]["items"][0]["item"] == corrupt
    assert prefetched["samples"] == sequential["samples"] == 9
    assert not _prefetch_threads()


def test_an_error_in_the_prefetch_thread_stops_the_encode(clip_dir, tmp_path, monkeypatch):
    """An exception while preparing a batch in the background thread is raised by encode_dataset, the shard it
    was in is not written, and the thread is gone."""
    prepare, calls = Encoders.prepare, []

    def fails_on_the_third_batch(self, clips, captions):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("text encoder broke")
        return prepare(self, clips, captions)

    monkeypatch.setattr(Encoders, "prepare", fails_on_the_third_batch)
    with pytest.raises(RuntimeError, match="text encoder broke"):
        _encode(clip_dir, tmp_path / "latents")
    assert set(calls) == {"osp-data-encode-prefetch"}
    finished = [path.name for path in (tmp_path / "latents").glob("*.tar")]
    assert len(finished) < len(read_index(str(clip_dir))["shards"]) and not (tmp_path / "latents/index.json").exists()
    assert not _prefetch_threads()


def test_an_error_in_the_vae_stops_the_prefetch_thread(clip_dir, tmp_path, monkeypatch):
    """When the VAE step fails in the main thread, the error propagates and the background thread ends."""

    def out_of_memory(self, batch):
        raise MemoryError("VAE out of memory")

    monkeypatch.setattr(Encoders, "encode_video", out_of_memory)
    with pytest.raises(MemoryError, match="VAE out of memory"):
        _encode(clip_dir, tmp_path / "latents")
    assert not _prefetch_threads()


def test_vae_options_and_prefetch_reach_the_encoders(clip_dir, tmp_path, monkeypatch):
    """encode_dataset builds its VAE with the vae_* options and passes prefetch to every shard."""
    seen = {}
    load, encode_shard = Encoders.load.__func__, encode_module.encode_shard

    def spy_load(cls, *args, **kwargs):
        seen["encoders"] = load(cls, *args, **kwargs)
        return seen["encoders"]

    def spy_shard(*args):
        seen.setdefault("prefetch", []).append(args[-1])
        return encode_shard(*args)

    monkeypatch.setattr(Encoders, "load", classmethod(spy_load))
    monkeypatch.setattr(encode_module, "encode_shard", spy_shard)
    clips = tmp_path / "clips"
    shutil.copytree(clip_dir, clips)
    index = read_index(str(clips))
    index["shards"] = index["shards"][:1]
    (clips / "index.json").write_text(json.dumps(index))
    _encode(clips, tmp_path / "latents", vae_chunk_frames=8, vae_channels_last=True, vae_fuse=True, prefetch=False)
    vae = seen["encoders"].vae
    assert (vae.chunk_frames, vae.channels_last, vae.compile_encoder, vae.fuse_elementwise) == (8, True, False, True)
    assert seen["prefetch"] == [False]
    _encode(clips, tmp_path / "latents_default", vae_chunk_frames=8, prefetch=False)
    vae = seen["encoders"].vae
    assert vae.channels_last is False and vae.fuse_elementwise is False  # the defaults on the CPU (on GPUs: on)


def test_cli_speed_flags_are_passed_on(tmp_path, monkeypatch, capsys):
    """--vae-chunk-frames, --(no-)vae-channels-last, --vae-compile and --no-prefetch reach encode_dataset; without them
    it gets the defaults; a chunk size off the stride exits with status 2 naming the flag."""
    calls = []
    monkeypatch.setattr(encode_module, "encode_dataset", lambda *args, **kwargs: calls.append(kwargs) or None)
    common = ["encode", "--input", str(tmp_path / "clips"), "--output", str(tmp_path / "latents"), "--no-progress"]
    flags = ["--vae-chunk-frames", "40", "--vae-channels-last", "--vae-compile", "--vae-fuse", "--no-prefetch"]
    assert main([*common, *flags]) == 0
    assert main(common) == 0
    keys = ("vae_chunk_frames", "vae_channels_last", "vae_compile", "vae_fuse", "prefetch")
    assert {k: calls[0][k] for k in keys} == {
        "vae_chunk_frames": 40,
        "vae_channels_last": True,
        "vae_compile": True,
        "vae_fuse": True,
        "prefetch": False,
    }
    assert "vae_chunk_frames" not in calls[1]  # encode_dataset's own default applies
    assert tuple(calls[1][k] for k in keys[1:]) == (None, False, None, True)
    assert main([*common, "--no-vae-channels-last", "--no-vae-fuse"]) == 0
    assert calls[2]["vae_channels_last"] is False and calls[2]["vae_fuse"] is False
    monkeypatch.undo()
    assert main([*common, "--vae-chunk-frames", "6"]) == 2
    assert "--vae-chunk-frames must be a multiple of the VAE temporal stride 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    assert f"(default {DEFAULT_CHUNK_FRAMES}," in capsys.readouterr().out


def test_bad_chunk_frames_is_refused_before_anything_is_written(clip_dir, tmp_path):
    """encode_dataset checks vae_chunk_frames first: a bad one leaves no output folder behind."""
    with pytest.raises(ConfigError, match="--vae-chunk-frames"):
        _encode(clip_dir, tmp_path / "latents", vae_chunk_frames=10)
    assert not (tmp_path / "latents").exists()


def _benchmark(tmp_path, *options):
    out = tmp_path / "encode.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_data_encode.py"), "--tiny", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.slow  # the benchmark runs in a subprocess, about 20 s
def test_speed_benchmark_tiny_mode_compares_the_paths(tmp_path):
    """bench_data_encode.py --tiny measures every VAE variant against diffusers' encode (errors at float32
    rounding), the end-to-end old path against the new default, and the per-batch-size table."""
    report, stdout = _benchmark(tmp_path)
    variants = {row["variant"]: row for row in report["vae_variants"]}
    assert all(row["status"] == "ok" and row["ms_per_clip"] > 0 for row in variants.values())
    assert variants["c4"]["rel_l2_vs_diffusers"] == 0.0  # diffusers' own chunking
    assert all(row["rel_l2_vs_diffusers"] < 1e-5 for row in variants.values())
    assert [(row["config"], row["prefetch"]) for row in report["end_to_end"][:2]] == [
        ("baseline", False),
        ("default", True),
    ]
    assert all(row["status"] == "ok" and row["clips_per_s"] > 0 for row in report["end_to_end"])
    assert report["ratios"]["end_to_end_default_vs_baseline"] > 0 and "vae_fastest_vs_diffusers" in report["ratios"]
    assert [row["batch_size"] for row in report["rows"]] == [1, 2]
    assert "[vae]" in stdout and "[e2e]" in stdout


def test_speed_benchmark_records_a_failing_variant_and_goes_on(tmp_path):
    """A variant that cannot run (here a chunk size off the stride) is recorded as failed with its error; the
    variants after it still run."""
    report, _ = _benchmark(tmp_path, "--cases", "vae", "--variants", "diffusers,c6,c8")
    rows = {row["variant"]: row for row in report["vae_variants"]}
    assert rows["c6"]["status"] == "failed" and "chunk_frames" in rows["c6"]["error"]
    assert rows["c8"]["status"] == "ok" and rows["c8"]["rel_l2_vs_diffusers"] < 1e-5
    assert report["end_to_end"] == [] and report["rows"] == []
