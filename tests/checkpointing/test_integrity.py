"""Checkpoint manifests: every damage to a file is found and named; intact folders pass."""

import json

import pytest

from osp_megatron.checkpointing.integrity import (
    MANIFEST,
    CheckpointCorruptError,
    checkpoint_files,
    file_digest,
    find_problems,
    verify_checkpoint,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tp00-of-01.safetensors").write_bytes(bytes(range(256)) * 100)
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank00000.pt").write_bytes(b"rank state")
    (tmp_path / "metadata.json").write_text("{}")
    write_manifest(tmp_path)
    return tmp_path


def test_manifest_lists_every_file_but_itself_and_metadata(folder):
    """The manifest covers the data files and skips the two top-level JSON files written after it."""
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model/tp00-of-01.safetensors", "ranks/rank00000.pt"]
    assert checkpoint_files(folder) == sorted(manifest["files"])
    assert manifest["files"]["ranks/rank00000.pt"] == file_digest(folder / "ranks" / "rank00000.pt")
    verify_checkpoint(folder)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated (1000 bytes on disk, 25600 written)"),
        (lambda p: p.write_bytes(p.read_bytes() + b"x"), "longer than written"),
        (lambda p: p.write_bytes(b"\xff" + p.read_bytes()[1:]), "content changed"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_damage_is_named(folder, damage, words):
    """Truncation, growth, a changed byte and a missing file each give an error naming the file."""
    damage(folder / "model" / "tp00-of-01.safetensors")
    with pytest.raises(CheckpointCorruptError) as err:
        verify_checkpoint(folder)
    assert "model/tp00-of-01.safetensors" in str(err.value) and words in str(err.value)


def test_size_only_check_skips_content(folder):
    """check_content=False finds size changes but not a flipped byte (the quick check)."""
    path = folder / "model" / "tp00-of-01.safetensors"
    path.write_bytes(b"\xff" + path.read_bytes()[1:])
    assert find_problems(folder, check_content=False) == []
    assert find_problems(folder, names=["ranks/rank00000.pt"]) == []


def test_old_checkpoint_without_manifest_passes_unless_required(tmp_path):
    """Checkpoints written before manifests existed stay loadable; a strict check reports the absence."""
    (tmp_path / "weights.bin").write_bytes(b"abc")
    assert find_problems(tmp_path) == []
    assert find_problems(tmp_path, require_manifest=True) == [f"no {MANIFEST}"]


def test_unreadable_manifest_is_corruption(folder):
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match=MANIFEST):
        verify_checkpoint(folder)


@pytest.mark.slow
def test_damaged_piece_of_a_checkpoint_without_manifest_is_named(tiny_checkpoint, tmp_path):
    """A checkpoint written before manifests existed, with a truncated tensor file: reading its tensors offline
    stops with CheckpointCorruptError naming the folder, and osp-sample exits 2 with one line saying the
    checkpoint is damaged, not with DCP's own exception (a BaseException) and its traceback."""
    import shutil
    import subprocess
    import sys

    from osp_megatron.checkpointing.offline import read_checkpoint_tensors

    checkpoint = next((tiny_checkpoint / "checkpoints").glob("step_*"))
    damaged = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, damaged)
    (damaged / "manifest.json").unlink()
    weights = next((damaged / "state").glob("*.distcp"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointCorruptError, match=r"state: \d+ tensors from 'model/.*' cannot be read"):
        read_checkpoint_tensors(damaged, "model")
    sample = subprocess.run(
        [sys.executable, "-m", "osp_megatron.inference.cli", "--checkpoint", str(damaged), "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert sample.returncode == 2, sample.stderr[-2000:]
    assert "its tensors cannot be read" in sample.stderr and "Traceback" not in sample.stderr
