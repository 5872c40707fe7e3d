"""Checkpoint integrity: a manifest of every file's size and CRC-32, written at save and checked at load.

A truncated, missing or bit-flipped file is reported by name before any tensor is read from it.
"""

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

from osp_megatron.config.errors import ConfigError

MANIFEST = "manifest.json"
_CHUNK = 16 * 2**20


class CheckpointCorruptError(ConfigError):
    """A checkpoint's files do not match its manifest (or it has none where one is required)."""


def file_digest(path: str | Path) -> dict:
    """{'size': bytes, 'crc32': 8 hex digits} of one file, read in 16 MiB chunks (~1 GB/s on one core)."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc & 0xFFFFFFFF:08x}"}


def checkpoint_files(folder: str | Path) -> list[str]:
    """Every file under `folder`, relative and sorted, except the top-level manifest and metadata (written
    after the manifest, as the completion mark)."""
    folder = Path(folder)
    top_level = {folder / MANIFEST, folder / "metadata.json"}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in top_level)


def digest_files(folder: str | Path, names: Iterable[str]) -> dict[str, dict]:
    folder = Path(folder)
    return {name: file_digest(folder / name) for name in names}


def write_manifest(folder: str | Path, digests: dict[str, dict] | None = None) -> dict:
    """Write folder/manifest.json (fsynced) from per-file digests; computes them when not given."""
    folder = Path(folder)
    if digests is None:
        digests = digest_files(folder, checkpoint_files(folder))
    manifest = {"algorithm": "crc32", "files": dict(sorted(digests.items()))}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"checkpoint {str(folder)!r}: {MANIFEST} is unreadable ({exc})") from exc
    return manifest


# Files whose content matched their manifest, keyed by (path, size, mtime): checked once per process.
_VERIFIED: set = set()


def _stat_key(path: Path):
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def file_problem(folder: Path, name: str, expected: dict, check_content: bool = True) -> str | None:
    """What is wrong with one file against its manifest entry, or None."""
    path = Path(folder) / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != expected["size"]:
        kind = "truncated" if size < expected["size"] else "longer than written"
        return f"{name}: {kind} ({size} bytes on disk, {expected['size']} written)"
    if check_content and _stat_key(path) not in _VERIFIED:
        crc = file_digest(path)["crc32"]
        if crc != expected["crc32"]:
            return f"{name}: content changed (CRC-32 {crc}, {expected['crc32']} written)"
        _VERIFIED.add(_stat_key(path))
    return None


def mark_verified(folder: str | Path) -> None:
    """Remember every manifest file of `folder` as checked (after a collective check split the work)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name in (manifest or {"files": {}})["files"]:
        if (folder / name).is_file():
            _VERIFIED.add(_stat_key(folder / name))


def verify_file(path: str | Path, check_content: bool = True, levels: int = 2) -> None:
    """Check one file of a checkpoint against the manifest of the checkpoint folder holding it (found up to
    `levels` folders above); a file no manifest lists passes. Raises CheckpointCorruptError naming it."""
    path = Path(path)
    folder = path.parent
    for _ in range(levels):
        manifest = read_manifest(folder)
        if manifest is not None:
            name = str(path.relative_to(folder))
            expected = manifest["files"].get(name)
            problem = None if expected is None else file_problem(folder, name, expected, check_content)
            if problem:
                raise CheckpointCorruptError(f"checkpoint {str(folder)!r} is damaged: {problem}")
            return
        folder = folder.parent


def find_problems(
    folder: str | Path, names: Iterable[str] | None = None, check_content: bool = True, require_manifest: bool = False
) -> list[str]:
    """Problems of the listed files (default: all in the manifest); [] when the checkpoint is intact.

    A checkpoint written before manifests existed has none: it passes unless `require_manifest`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"no {MANIFEST}"] if require_manifest else []
    files = manifest["files"]
    selected = files if names is None else {n: files[n] for n in names if n in files}
    problems = []
    for name, expected in selected.items():
        problem = file_problem(folder, name, expected, check_content)
        if problem:
            problems.append(problem)
    return problems


def verify_checkpoint(folder: str | Path, names: Iterable[str] | None = None, check_content: bool = True) -> None:
    """Raise CheckpointCorruptError naming every damaged file of `folder` (or of `names` in it)."""
    problems = find_problems(folder, names, check_content)
    if problems:
        raise CheckpointCorruptError(f"checkpoint {str(folder)!r} is damaged: " + "; ".join(problems))
