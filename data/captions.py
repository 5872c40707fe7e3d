"""Caption files: JSONL or CSV rows naming a video, its caption, and optionally a time range and frame rate.

Columns: path (relative to the videos folder, or absolute), caption, start and end (seconds), fps (the video's own).
"""

import csv
import json
import os
from dataclasses import dataclass

from osp_megatron.config.errors import ConfigError

from .problems import ProblemLog

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")


@dataclass(frozen=True)
class CaptionEntry:
    line: int  # 1-based line (JSONL) or row (CSV, header excluded) number: the entry's identity
    path: str
    caption: str
    start: float | None = None
    end: float | None = None
    fps: float | None = None  # the video's own frame rate, when its container reports a wrong one


def _number(value, name, where):
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: '{name}' must be a number of seconds, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{where}: '{name}' must not be negative, got {value!r}")
    return number


def _entry(row, line, where):
    """CaptionEntry of one row; ValueError naming the problem for a bad row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'path' and 'caption', got {row!r}")
    path = row.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{where}: no 'path'")
    caption = row.get("caption")
    caption = caption.strip() if isinstance(caption, str) else ""
    start, end = _number(row.get("start"), "start", where), _number(row.get("end"), "end", where)
    fps = _number(row.get("fps"), "fps", where)
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{where}: 'end' ({end}) must be after 'start' ({start})")
    if fps == 0:
        raise ValueError(f"{where}: 'fps' must be positive")
    return CaptionEntry(line, path.strip(), caption, start, end, fps)


def read_captions(path: str, problems: ProblemLog) -> list[CaptionEntry]:
    """Entries of a .jsonl/.json-lines or .csv caption file; bad rows go to `problems` and are skipped."""
    if not os.path.isfile(path):
        raise ConfigError(f"--captions {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ConfigError(
            f"--captions {path!r} is an empty file; expected one JSON object a line, or CSV with the "
            "header path,caption[,start,end,fps]"
        )
    entries = []
    with open(path, encoding="utf-8", newline="") as handle:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(handle)
            missing = {"path", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(
                    f"--captions {path}: the CSV header {reader.fieldnames} lacks the column(s) "
                    f"{sorted(missing)}; expected path,caption[,start,end,fps]"
                )
            rows = ((number, row, f"{path} row {number}") for number, row in enumerate(reader, start=1))
        else:
            rows = (
                (number, text, f"{path} line {number}") for number, text in enumerate(handle, start=1) if text.strip()
            )
        for number, row, where in rows:
            try:
                if isinstance(row, str):
                    try:
                        row = json.loads(row)
                    except ValueError as exc:
                        raise ValueError(f"{where}: not JSON ({exc})") from None
                entries.append(_entry(row, number, where))
            except ValueError as exc:
                problems.report("bad caption row", where, str(exc).split(": ", 1)[-1])
    return entries


def list_videos(folder: str) -> list[str]:
    """Relative paths of the video files under `folder` (recursive, sorted)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--videos {folder!r} is not a folder")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)
