"""Typed configuration of one text-to-video sampling run (the `sample:` section of a YAML file).

Defaults follow Wan2.1 480P sampling: 81 frames at 16 fps, 50 UniPC steps, shift 5, guidance 5.
"""

from dataclasses import dataclass
from typing import Literal

from osp_megatron.config.errors import ConfigError

SAMPLERS = ("euler", "unipc")  # flow-matching samplers (inference/sampler.py)


@dataclass
class SampleConfig:
    """What to generate and where to write it; checkpoint and model settings live in their own sections."""

    prompt: str | list[str] = "a red circle moving left"
    negative_prompt: str = ""
    num_steps: int = 50
    shift: float = 5.0
    guidance_scale: float = 5.0
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    seed: int = 0  # video i of a run gets seed + i unless its prompt-file line sets its own
    sampler: Literal["euler", "unipc"] = "unipc"
    # auto: a bf16 copy of the weights on accelerators, fp32 on the CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Where the video goes (a PNG strip of its frames is written beside it). With several prompts, files are
    # written as <stem>-000.mp4, <stem>-001.mp4, ... Unset: training writes run.dir/samples/step_N.mp4,
    # osp-sample writes outputs/sample.mp4.
    output: str | None = None
    # osp-sample over many prompts: a folder of <index>-<prompt>.mp4 with a .json record and a .png strip each
    output_dir: str | None = None
    prompt_file: str | None = None  # .txt (one prompt a line) or .jsonl (see docs/inference.md)
    videos_per_prompt: int = 1
    batch_size: int = 1  # videos denoised together on one model replica
    cfg_parallel: bool = False  # conditional and unconditional passes on two data-parallel ranks
    frames: bool = False  # also write every frame as a PNG (<video stem>_frames/00000.png ...)

    @property
    def prompts(self):
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def validate(self, prefix="sample"):
        """Raise ConfigError naming `prefix.key` for the first invalid field; return self."""
        prompts = self.prompt if isinstance(self.prompt, (list, tuple)) else [self.prompt]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError(f"{prefix}.prompt must be a non-empty string or list of strings, got {self.prompt!r}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"{prefix}.negative_prompt must be a string, got {self.negative_prompt!r}")
        for key in ("num_steps", "num_frames", "height", "width", "videos_per_prompt", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{key} must be a positive integer, got {value!r}")
        if (self.num_frames - 1) % 4:
            raise ConfigError(
                f"{prefix}.num_frames must be 1 + a multiple of 4 (the VAE's temporal stride), "
                f"e.g. 81, got {self.num_frames}"
            )
        for key in ("height", "width"):
            if getattr(self, key) % 8:
                raise ConfigError(
                    f"{prefix}.{key} must be a multiple of 8 (the VAE's spatial stride; 16 with a "
                    f"2x2 patch), got {getattr(self, key)}"
                )
        for key in ("shift", "fps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{prefix}.{key} must be a positive number, got {value!r}")
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ConfigError(
                f"{prefix}.guidance_scale must be a number >= 0 (1 disables guidance), got {self.guidance_scale!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{prefix}.seed must be a non-negative integer, got {self.seed!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"{prefix}.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.output is not None and (not isinstance(self.output, str) or not self.output.endswith(".mp4")):
            raise ConfigError(f"{prefix}.output must be a path ending in .mp4, got {self.output!r}")
        return self

    def output_paths(self, default="outputs/sample.mp4"):
        """One .mp4 path per prompt, from `output` (or `default` when unset)."""
        output = self.output or default
        if len(self.prompts) == 1:
            return [output]
        stem = output[: -len(".mp4")]
        return [f"{stem}-{i:03d}.mp4" for i in range(len(self.prompts))]
