"""Tests of the synthetic data set: real webdataset shards, learnable content, idempotent writing.

Uses the session shard set of conftest.py plus a few tiny private ones.
"""

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import webdataset

from osp_megatron.config.errors import ConfigError
from osp_megatron.data import synthetic
from osp_megatron.data.shards import iter_raw_samples
from osp_megatron.engine import data as engine_data
from osp_megatron.engine.data import make_synthetic_shards
from osp_megatron.models.text_encoder import build_text_encoder


def _read_all(folder):
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return list(dataset)


def test_shards_are_webdataset_tars_with_expected_fields_and_shapes(shard_dir):
    """webdataset itself reads every shard; each sample has latent [C,T,H,W], text [l, D], txt and json."""
    samples = _read_all(shard_dir)
    assert len(samples) == 50
    assert sorted(os.listdir(shard_dir)) == [".osp-synthetic", "index.json"] + [f"shard-{i:06d}.tar" for i in range(7)]
    assert len({s["__key__"] for s in samples}) == 50
    for sample in samples:
        assert sample["latent.npy"].shape == (16, 2, 4, 6) and sample["latent.npy"].dtype == np.float32
        text = sample["text.npy"]
        assert text.dtype == np.float32 and text.ndim == 2 and text.shape[1] == 16 and 1 <= text.shape[0] <= 32
        assert sample["json"]["caption"] == sample["txt"]
        assert sample["json"]["text_length"] == text.shape[0]


def test_index_lists_every_shard_with_its_sample_count(shard_dir):
    """index.json names each shard with its number of samples and records the shapes."""
    index = json.loads((shard_dir / "index.json").read_text())
    assert [e["num_samples"] for e in index["shards"]] == [8] * 6 + [2]
    assert index["latent_shape"] == [16, 2, 4, 6] and index["text_len"] == 32 and index["text_dim"] == 16


def test_text_states_are_the_tiny_encoder_states_of_the_caption(shard_dir):
    """text.npy equals the seeded tiny text encoder's unpadded states of the caption, so sampling can match."""
    sample = _read_all(shard_dir)[0]
    states, lengths = build_text_encoder(None, 16, 32, seed=3).encode([sample["txt"]])
    assert sample["text.npy"].shape[0] == int(lengths[0])
    torch.testing.assert_close(torch.from_numpy(sample["text.npy"]), states[0, : lengths[0]], atol=1e-5, rtol=1e-5)


def test_latent_is_a_function_of_the_caption_plus_small_noise(shard_dir):
    """Samples with the same caption differ only by the small noise; different captions differ far more."""
    by_caption = {}
    for sample in _read_all(shard_dir):
        by_caption.setdefault(sample["txt"], []).append(sample["latent.npy"])
    repeated = [latents for latents in by_caption.values() if len(latents) > 1]
    assert repeated, "the vocabulary is small enough that 50 samples repeat a caption"
    same = np.std(repeated[0][0] - repeated[0][1])
    assert same < 2 * synthetic.NOISE_STD
    clean = [
        synthetic.blob_latent(*words, (16, 2, 4, 6))
        for words in [
            ("red", "circle", "moving left"),
            ("blue", "circle", "moving left"),
            ("red", "tall bar", "moving up"),
        ]
    ]
    assert np.std(clean[0] - clean[1]) > 5 * synthetic.NOISE_STD
    assert np.std(clean[0] - clean[2]) > 5 * synthetic.NOISE_STD


def test_motion_moves_the_blob_in_the_named_direction():
    """'moving right' puts the blob's centre of mass further right in the last frame than in the first."""
    latent = synthetic.blob_latent("white", "circle", "moving right", (4, 5, 16, 16))
    energy = (latent**2).sum(axis=(0, 2))  # [T, W]
    centre = (energy * np.arange(16)).sum(axis=1) / energy.sum(axis=1)
    assert np.all(np.diff(centre) > 0)


def _checksums(folder):
    """sha256 of every file under folder, by relative path: what a refusal must leave exactly as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _user_folder(tmp_path, shard_dir, kind):
    """Folders that synthetic generation must refuse: the user's real shards with an index, shards without an
    index, and a folder of unrelated files with a foreign index.json."""
    folder = tmp_path / kind
    folder.mkdir()
    if kind in ("real shards", "no index"):
        for shard in sorted(shard_dir.glob("shard-*.tar"))[:2]:
            shutil.copy(shard, folder / shard.name)
    if kind == "real shards":
        (folder / "index.json").write_text(
            json.dumps(
                {
                    "shards": [
                        {"name": "shard-000000.tar", "num_samples": 8},
                        {"name": "shard-000001.tar", "num_samples": 8},
                    ]
                }
            )
        )
    if kind == "foreign":
        (folder / "index.json").write_text('{"shards": [], "owner": "another tool"}')
        (folder / "notes.txt").write_text("my experiment")
        (folder / "sub").mkdir()
        (folder / "sub" / "clip.mp4").write_bytes(b"\x00" * 64)
    return folder


@pytest.mark.parametrize("kind", ["real shards", "no index", "foreign"])
def test_folders_it_did_not_make_are_refused_untouched(tmp_path, shard_dir, make_config, kind):
    """A folder without the generator's marker is refused with its name and the way out; no byte changes."""
    folder = _user_folder(tmp_path, shard_dir, kind)
    before = _checksums(folder)
    config = make_config(folder, synthetic=True, synthetic_num_samples=16, synthetic_samples_per_shard=8)
    with pytest.raises(ConfigError) as error:
        engine_data.ensure_synthetic_data(config)
    message = str(error.value)
    assert str(folder) in message and "data.path" in message and "data.synthetic=false" in message
    assert _checksums(folder) == before


def test_a_file_as_data_path_is_refused(tmp_path):
    """data.path naming a file is an error that leaves the file alone."""
    target = tmp_path / "shards.tar"
    target.write_bytes(b"user data")
    with pytest.raises(ConfigError, match="data.path .* is a file"):
        make_synthetic_shards(str(target), 4, 4, (16, 1, 2, 2), 32, 8)
    with pytest.raises(ConfigError, match="data.eval_path .* is a file"):  # the held-out set names its own key
        make_synthetic_shards(str(target), 4, 4, (16, 1, 2, 2), 32, 8, held_out=True)
    assert target.read_bytes() == b"user data"


def test_existing_complete_data_is_reused(tmp_path):
    """A second call with the same parameters rewrites nothing."""
    make_synthetic_shards(str(tmp_path), 6, 4, (16, 1, 2, 2), 32, 8, seed=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    checksums = _checksums(tmp_path)
    shards = make_synthetic_shards(str(tmp_path), 6, 4, (16, 1, 2, 2), 32, 8, seed=0)
    assert [s.num_samples for s in shards] == [4, 2]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    assert _checksums(tmp_path) == checksums
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_own_partial_set_is_completed(tmp_path):
    """A set the generator began and was killed in (marker, some shards, a temporary file, no index) is finished
    with the same samples as an uninterrupted one; a file someone else put there is left alone."""
    complete, partial = tmp_path / "complete", tmp_path / "partial"
    make_synthetic_shards(str(complete), 12, 4, (16, 1, 2, 2), 32, 8, seed=2)
    make_synthetic_shards(str(partial), 12, 4, (16, 1, 2, 2), 32, 8, seed=2)
    (partial / "index.json").unlink()
    (partial / "shard-000002.tar").unlink()
    (partial / ".shard-000002.tar.tmp-99999").write_bytes(b"half a shard")
    (partial / "README").write_text("kept")
    make_synthetic_shards(str(partial), 12, 4, (16, 1, 2, 2), 32, 8, seed=2)
    assert (partial / "README").read_text() == "kept"
    assert sorted(p.name for p in partial.iterdir()) == sorted([p.name for p in complete.iterdir()] + ["README"])
    assert (partial / "index.json").read_bytes() == (complete / "index.json").read_bytes()
    for shard in sorted(complete.glob("shard-*.tar")):
        # Tar headers carry write times, so the samples are compared, not the files' bytes.
        expected, found = (
            [{k: v for k, v in sample.items() if k != "__url__"} for sample in iter_raw_samples(str(path))]
            for path in (shard, partial / shard.name)
        )
        assert found == expected


def test_own_set_with_other_parameters_is_refused(tmp_path):
    """Asking for other parameters in a folder holding a generated set names the folder instead of overwriting."""
    make_synthetic_shards(str(tmp_path), 4, 4, (16, 1, 2, 2), 32, 8, seed=0)
    before = _checksums(tmp_path)
    with pytest.raises(ConfigError, match="holds a different synthetic data set"):
        make_synthetic_shards(str(tmp_path), 4, 4, (16, 1, 2, 2), 32, 8, seed=1)
    assert _checksums(tmp_path) == before


def test_generation_is_deterministic(tmp_path):
    """The same seed writes byte-identical shards."""
    make_synthetic_shards(str(tmp_path / "a"), 4, 4, (16, 1, 2, 2), 32, 8, seed=5)
    make_synthetic_shards(str(tmp_path / "b"), 4, 4, (16, 1, 2, 2), 32, 8, seed=5)
    a = [s["latent.npy"] for s in _read_all(tmp_path / "a")]
    b = [s["latent.npy"] for s in _read_all(tmp_path / "b")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_console_entry_writes_shards_and_documents_every_flag(tmp_path, capsys):
    """osp-make-synthetic writes a data set, and --help describes each of its flags."""
    out = tmp_path / "cli"
    assert (
        engine_data.main(
            [
                "--out",
                str(out),
                "--num-samples",
                "3",
                "--samples-per-shard",
                "2",
                "--latent-frames",
                "1",
                "--latent-height",
                "2",
                "--latent-width",
                "2",
                "--text-dim",
                "8",
            ]
        )
        == 0
    )
    assert len(_read_all(out)) == 3
    with pytest.raises(SystemExit) as exit_info:
        engine_data.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--out",
        "--num-samples",
        "--samples-per-shard",
        "--latent-channels",
        "--latent-frames",
        "--latent-height",
        "--latent-width",
        "--text-len",
        "--text-dim",
        "--seed",
        "--text-encoder",
        "--vae",
    ):
        assert flag in help_text


def test_npy_entries_decode_without_pickle(shard_dir):
    """The .npy payloads are plain arrays (no pickled objects), safe to load with allow_pickle=False."""
    import tarfile

    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("latent.npy"))
        np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)


@pytest.mark.parametrize(
    "colour, shape, motion",
    [
        ("red", "circle", "moving up"),
        ("blue", "square", "moving left"),
        ("white", "wide bar", "moving right"),
        ("purple", "tall bar", "moving down"),
        ("yellow", "circle", "staying still"),
    ],
)
def test_rendered_video_shows_its_caption(colour, shape, motion):
    """The renderer paints the palette colour over the background and moves it the named way."""
    video = synthetic.render_caption_video(colour, shape, motion, 9, 64, 48)
    assert video.shape == (9, 64, 48, 3) and video.dtype == np.uint8
    background = np.round(synthetic.background_image(64, 48))
    np.testing.assert_array_equal(video[0, 0, 0], background[0, 0])
    np.testing.assert_array_equal(video[-1, -1, -1], background[-1, -1])
    measured = synthetic.measure_blob(video)
    assert measured.colour == colour and measured.motion() == motion and measured.shape() == shape
    np.testing.assert_allclose(measured.rgb, synthetic.COLOUR_RGB[colour], atol=12)
    np.testing.assert_allclose(measured.centres, synthetic.blob_centres(motion, 9), atol=0.02)
    # The palette colour itself fills the shape's interior exactly.
    centre_x, centre_y = synthetic.blob_centres(motion, 9)[4]
    assert tuple(video[4, int(centre_y * 64), int(centre_x * 48)]) == synthetic.COLOUR_RGB[colour]


def test_background_shading_tells_position():
    """The background is BACKGROUND_RGB at the centre; its red rises from left to right and its blue from top to
    bottom by BACKGROUND_SHADE, green stays, so every pixel's place can be read from its colour."""
    image = synthetic.background_image(64, 48)
    np.testing.assert_allclose(image[31:33, 23:25].mean(axis=(0, 1)), synthetic.BACKGROUND_RGB)
    np.testing.assert_allclose(image[0, -1, 0] - image[0, 0, 0], synthetic.BACKGROUND_SHADE * 47 / 48)
    np.testing.assert_allclose(image[-1, 0, 2] - image[0, 0, 2], synthetic.BACKGROUND_SHADE * 63 / 64)
    assert np.ptp(image[..., 1]) == 0 and np.ptp(image[:, 0, 0]) == 0 and np.ptp(image[0, :, 2]) == 0
    assert image.min() >= 0


def test_shapes_differ_in_their_extents():
    """A wide bar is wider than tall, a tall bar taller than wide, and a square fills more than a circle."""

    def extent(shape):
        mask = np.any(synthetic.render_caption_video("green", shape, "staying still", 1, 64, 64)[0] > 100, axis=-1)
        return mask.any(axis=0).sum(), mask.any(axis=1).sum(), mask.sum()

    wide, tall, square, circle = (extent(s) for s in ("wide bar", "tall bar", "square", "circle"))
    assert wide[0] > 2 * wide[1] and tall[1] > 2 * tall[0]
    assert square[2] > circle[2] and abs(square[0] - circle[0]) <= 4


def test_renderer_rejects_words_outside_the_vocabulary():
    """An unknown word names itself and the allowed ones."""
    with pytest.raises(ConfigError, match="'orange'.*red"):
        synthetic.render_caption_video("orange", "circle", "moving up", 5, 16, 16)


def test_held_out_set_shares_the_text_encoder_but_no_samples(tmp_path):
    """The held-out set of a seed encodes captions with the training set's text encoder, draws other samples,
    and cannot be mistaken for the training set in either folder; ensure_synthetic_data makes both."""
    from osp_megatron.engine.config import load_job_config

    config = load_job_config(
        None,
        [
            "data.synthetic=true",
            f"data.path={tmp_path / 'train'}",
            f"data.eval_path={tmp_path / 'eval'}",
            "data.synthetic_num_samples=16",
            "data.synthetic_samples_per_shard=16",
            "data.latent_frames=1",
            "data.latent_height=2",
            "data.latent_width=2",
        ],
    ).data
    engine_data.ensure_synthetic_data(config, held_out_samples=8)
    train, held_out = _read_all(tmp_path / "train"), _read_all(tmp_path / "eval")
    assert (len(train), len(held_out)) == (16, 8)
    text_by_caption = {s["txt"]: s["text.npy"] for s in train}
    shared = [s for s in held_out if s["txt"] in text_by_caption]
    assert shared and all(np.array_equal(s["text.npy"], text_by_caption[s["txt"]]) for s in shared)
    train_latents = [s["latent.npy"] for s in train]
    assert not any(np.array_equal(s["latent.npy"], t) for s in held_out for t in train_latents)
    with pytest.raises(ConfigError, match="holds a different synthetic data set"):
        make_synthetic_shards(str(tmp_path / "eval"), 16, 16, config.latent_shape, config.text_len, config.text_dim)
    with pytest.raises(ConfigError, match="data.eval_path must differ from data.path"):
        load_job_config(None, ["data.synthetic=true", "data.path=x", "data.eval_path=x"])
