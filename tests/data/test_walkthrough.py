"""docs/data.md's laptop walk-through, run as written on six short videos: build, encode, inspect, bench, train.

The commands are read from the page itself, so the page cannot drift from what runs.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.inference.video_io import write_video

from .conftest import moving_square_video

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Six videos a user might have: landscape, portrait and square, 1.5 to 4 s at 24 or 30 fps.
VIDEOS = [
    ((180, 320), 24, 72),
    ((320, 180), 30, 60),
    ((240, 240), 24, 48),
    ((360, 640), 30, 120),
    ((180, 320), 24, 36),
    ((320, 240), 24, 96),
]


def walkthrough_commands(page: Path = ROOT / "docs" / "data.md") -> list[str]:
    """The shell commands of the first code block under '## Walk-through', continuation lines joined."""
    section = page.read_text().split("## Walk-through", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return [line for line in lines if not line.lstrip().startswith("#")]


def make_videos(folder: Path) -> None:
    folder.mkdir()
    with open(folder / "captions.jsonl", "w") as handle:
        for number, ((height, width), fps, frames) in enumerate(VIDEOS):
            write_video(str(folder / f"video{number}.mp4"), moving_square_video(frames, height, width, number), fps=fps)
            handle.write(json.dumps({"path": f"video{number}.mp4", "caption": f"a square {number} sliding"}) + "\n")


def test_walkthrough_runs_as_written_on_six_videos(tmp_path):
    """Every command of the walk-through exits 0 from a folder holding examples/ and six videos; warnings are
    one plain line each, and the run trains to its last step."""
    make_videos(tmp_path / "my_videos")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    commands = walkthrough_commands()
    assert [command.split()[:2] for command in commands] == [
        ["osp-data", "build"],
        ["osp-data", "encode"],
        ["osp-data", "inspect"],
        ["osp-data", "bench"],
        ["osp-train", "--config"],
    ]
    outputs = []
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert "Warning:" not in result.stderr and "warnings.warn" not in result.stderr, result.stderr
        outputs.append(result.stdout)
    assert "no bad input" in outputs[0] and "checked every sample: 0 bad" in outputs[2]
    assert "samples/s" in outputs[3]
    assert "finished at step 200" in outputs[4]
