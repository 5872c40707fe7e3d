"""Which denoising steps of a GRPO rollout are SDE (sampled and trained) and how the others are solved.

Mix-GRPO: a window of w SDE steps [l, l + w) moves by `stride` every `shift_interval` iterations and wraps;
"fixed" keeps it at its first position (step `offset`, 0 by default). Steps before it are Euler ODE
steps; after it Euler, or with `flash` a second-order solver on a grid `flash_stride` times coarser.
"""

from dataclasses import dataclass

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.sampler import flow_timesteps


def window_start(
    iteration: int,
    num_steps: int,
    window_size: int,
    mode: str = "sliding",
    shift_interval: int = 1,
    stride: int = 1,
    offset: int = 0,
) -> int:
    """First SDE step l of the window at `iteration`: offset, offset + stride, ... up to num_steps - window_size,
    each held `shift_interval` iterations, then back to offset ("fixed": always offset)."""
    if not 1 <= window_size <= num_steps:
        raise ConfigError(f"grpo.window_size must be in [1, grpo.num_steps={num_steps}], got {window_size}")
    if not 0 <= offset <= num_steps - window_size:
        raise ConfigError(
            f"grpo.window_offset must be in [0, grpo.num_steps - grpo.window_size = "
            f"{num_steps - window_size}], got {offset}"
        )
    if mode == "fixed":
        return offset
    if mode != "sliding":
        raise ConfigError(f"grpo.window_mode must be 'sliding' or 'fixed', got {mode!r}")
    positions = (num_steps - window_size - offset) // stride + 1
    return offset + (iteration // shift_interval) % positions * stride


@dataclass(frozen=True)
class RolloutPlan:
    """The noise levels of one rollout and what runs at each step.

    sigmas: the points visited, from 1 to 0 (float64); kinds[i] says how step sigmas[i] -> sigmas[i + 1] runs:
    "ode" (Euler, no gradient), "sde" (sampled, recorded for the learner) or "flash" (second-order solver).
    """

    sigmas: torch.Tensor
    kinds: tuple

    @property
    def sde_steps(self) -> list[int]:
        return [i for i, kind in enumerate(self.kinds) if kind == "sde"]

    @property
    def model_evaluations(self) -> int:
        """Velocity evaluations per sample (before classifier-free guidance doubles them)."""
        return len(self.kinds)


def rollout_plan(
    num_steps: int, shift: float, start: int, window_size: int, flash: bool = False, flash_stride: int = 2
) -> RolloutPlan:
    """The plan for a window [start, start + window_size) of a `num_steps`-step shifted grid."""
    grid = flow_timesteps(num_steps, shift)
    end = start + window_size
    if start < 0 or end > num_steps:
        raise ConfigError(f"SDE window [{start}, {end}) does not fit {num_steps} steps")
    kinds = ["ode"] * start + ["sde"] * window_size
    points = list(grid[: end + 1])
    tail = list(range(end, num_steps + 1))
    if flash and len(tail) > 2:
        # Every flash_stride-th point of the rest of the grid, always ending exactly at 0.
        coarse = tail[::flash_stride]
        if coarse[-1] != num_steps:
            coarse.append(num_steps)
        points += [grid[i] for i in coarse[1:]]
        kinds += ["flash"] * (len(coarse) - 1)
    else:
        points += [grid[i] for i in tail[1:]]
        kinds += ["ode"] * (len(tail) - 1)
    return RolloutPlan(torch.stack(points), tuple(kinds))


def ode_plan(num_steps: int, shift: float) -> RolloutPlan:
    """Every step an Euler ODE step: the deterministic sampler, for evaluation."""
    return RolloutPlan(flow_timesteps(num_steps, shift), ("ode",) * num_steps)
