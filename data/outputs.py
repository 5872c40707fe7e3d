"""Output folders of the data jobs: claimed once with the job's settings, reopened only with the same ones.

A folder holding another data set, or a job made with other settings, is refused instead of being mixed in.
"""

import json
import os

from osp_megatron.config.errors import ConfigError
from osp_megatron.data.shards import INDEX_NAME, atomic_write_bytes, read_index


def claim_output(output: str, options_path: str, data_format: str, options: dict) -> None:
    """Create `output`, or reopen it when `options_path` holds the same settings; ConfigError otherwise."""
    os.makedirs(os.path.dirname(options_path), exist_ok=True)
    index = read_index(output)
    if index is not None and index.get("format") != data_format:
        raise ConfigError(
            f"--output {output}: holds another data set ({INDEX_NAME} format "
            f"{index.get('format')!r}); choose an empty folder"
        )
    if os.path.isfile(options_path):
        with open(options_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        changed = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
        if changed:
            raise ConfigError(
                f"--output {output}: was made with other settings ({', '.join(changed)}); rerun with "
                "the same settings to resume, or choose another --output"
            )
        return
    state_dir = os.path.relpath(os.path.dirname(options_path), output).split(os.sep)[0]
    if any(name != state_dir for name in os.listdir(output)):
        raise ConfigError(
            f"--output {output}: is not empty and holds no {os.path.basename(options_path)} of an "
            "earlier run; choose an empty folder"
        )
    atomic_write_bytes(options_path, json.dumps(options, indent=1).encode())
