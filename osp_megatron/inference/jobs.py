"""The videos of a sampling run: file names, seeds and settings of each, and the JSON record that marks one done.

A record is written (atomically) after its .mp4 and .png strip, so a job killed at any moment leaves no video
that a restart would count as done; a restart renders exactly the videos without a record.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.prompts import PromptSpec

DEFAULT_OUTPUT = "outputs/sample.mp4"  # osp-sample's single video when sample.output is unset
# The settings a record must repeat for its video to count as done for this run.
SETTINGS = (
    "prompt",
    "negative_prompt",
    "seed",
    "num_frames",
    "height",
    "width",
    "fps",
    "sampler",
    "num_steps",
    "shift",
    "guidance_scale",
    "weights",
)


@dataclass(frozen=True)
class VideoJob:
    """One video: what to render and the three files it becomes (video, strip, record)."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    video: str
    strip: str
    record: str

    @property
    def size(self) -> tuple[int, int, int]:
        return self.num_frames, self.height, self.width

    def settings(self, sample, weights: str) -> dict:
        """The record's settings: this video's own plus the run's sampler settings and weights."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "fps": sample.fps,
            "sampler": sample.sampler,
            "num_steps": sample.num_steps,
            "shift": float(sample.shift),
            "guidance_scale": float(sample.guidance_scale),
            "weights": weights,
        }


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe, lower-case rendering of a prompt's start."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return cleaned[:limit].rstrip("_") or "prompt"


def plan_jobs(
    specs: list[PromptSpec], sample, output_dir: str | None = None, record_dir: str | None = None
) -> list[VideoJob]:
    """One VideoJob per prompt and video index, in prompt order.

    Names: in `output_dir`, <index>-<prompt slug>[-<k>] (or the prompt's own "name"); without it, a single video
    goes to sample.output and several to <output stem>-000.mp4, -001, ... Seeds: a prompt's own seed + k, else
    sample.seed + the video's position in the run. Strips and records sit beside each video, or in `record_dir`.
    """
    count = sample.videos_per_prompt
    total = len(specs) * count
    jobs = []
    for number, spec in enumerate(specs):
        for k in range(count):
            index = number * count + k
            if output_dir is not None:
                stem = spec.name if spec.name is not None else f"{number:05d}-{slug(spec.prompt)}"
                video = Path(output_dir) / (f"{stem}-{k}.mp4" if count > 1 else f"{stem}.mp4")
            else:
                output = sample.output or DEFAULT_OUTPUT
                video = Path(output if total == 1 else f"{output[: -len('.mp4')]}-{index:03d}.mp4")
            side = Path(record_dir) / video.stem if record_dir is not None else video.with_suffix("")
            seed = spec.seed + k if spec.seed is not None else sample.seed + index
            jobs.append(
                VideoJob(
                    index=index,
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt
                    if spec.negative_prompt is not None
                    else sample.negative_prompt,
                    seed=seed,
                    num_frames=spec.num_frames or sample.num_frames,
                    height=spec.height or sample.height,
                    width=spec.width or sample.width,
                    video=str(video),
                    strip=f"{side}.png",
                    record=f"{side}.json",
                )
            )
    duplicates = len(jobs) - len({job.video for job in jobs})
    if duplicates:
        raise ConfigError(
            f"{duplicates} videos of this run would share a file name; give the prompts distinct "
            f'"name"s (or drop the repeated ones)'
        )
    return jobs


def is_done(job: VideoJob, settings: dict) -> bool:
    """Whether the video has its record; a record with other settings stops the run instead of mixing results."""
    if not (os.path.isfile(job.record) and os.path.isfile(job.video)):
        return False
    try:
        with open(job.record, encoding="utf-8") as handle:
            recorded = json.load(handle)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: render again (the record is only ever replaced whole)
    changed = [key for key in SETTINGS if recorded.get(key) != settings.get(key)]
    if changed:
        raise ConfigError(
            f"{job.video} was rendered with other settings ({', '.join(changed)}: "
            f"{[recorded.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
            "write this run to another output folder or delete the old videos"
        )
    return True


def write_json_atomically(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_record(job: VideoJob, settings: dict, **extra) -> None:
    """Mark `job` done: its settings, file names and whatever `extra` holds (render time, parallel layout)."""
    write_json_atomically(
        job.record,
        {
            "settings": settings,
            "video": os.path.basename(job.video),
            "strip": os.path.basename(job.strip),
            "index": job.index,
            **extra,
        },
    )


def remove_stale_temporaries(jobs: list[VideoJob]) -> int:
    """Delete the hidden partial files (.<name>.tmp-<pid>) a killed run left in the run's folders."""
    folders = {os.path.dirname(os.path.abspath(path)) for job in jobs for path in (job.video, job.record)}
    removed = 0
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp-" in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed
