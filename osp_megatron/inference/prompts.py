"""Prompt lists for osp-sample: the command line, a text file (one prompt a line) or JSONL with per-prompt settings.

A JSONL line: {"prompt": "...", "negative_prompt": "...", "seed": 7, "num_frames": 81, "height": 480, "width": 832,
"name": "file-stem"}; only "prompt" is required, the rest default to the sample section's settings.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

from osp_megatron.config.errors import ConfigError


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: the run's `sample.*` value)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    name: str | None = None  # file stem of its video(s); default: index and prompt


_KEYS = tuple(f.name for f in fields(PromptSpec))
_INTEGER_KEYS = ("seed", "num_frames", "height", "width")


def spec_from_dict(data, where: str) -> PromptSpec:
    """A PromptSpec from one JSON object; `where` (file:line) names the culprit in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f'{where}: expected a JSON object with a "prompt", got {data!r}')
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f'{where}: "prompt" must be a non-empty string, got {prompt!r}')
    for key in _INTEGER_KEYS:
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f'{where}: "{key}" must be a non-negative integer, got {value!r}')
    for key in ("negative_prompt", "name"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f'{where}: "{key}" must be a string, got {value!r}')
    name = data.get("name")
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise ConfigError(f"{where}: \"name\" must be a file stem without '/' and not starting with '.', got {name!r}")
    return PromptSpec(**{key: data.get(key) for key in _KEYS})


def read_prompt_file(path) -> list[PromptSpec]:
    """Prompts of a .txt file (one a line, blank lines skipped) or a .jsonl file (one JSON object a line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(
            f"prompt file {str(path)!r}: use a .txt file (one prompt a line) or .jsonl (one JSON object a line)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            specs.append(spec_from_dict(data, f"{path}:{number}"))
        else:
            specs.append(PromptSpec(prompt=line.strip()))
    if not specs:
        raise ConfigError(f"prompt file {str(path)!r} holds no prompts")
    return specs
