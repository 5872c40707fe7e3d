"""Flow-matching samplers: diffusers' Euler and UniPC schedulers stepped by the framework's loop.

Convention shared with training: x_s = (1 - s) x0 + s noise, the model predicts v = noise - x0 at timestep 1000 s.
"""

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.sample_config import SAMPLERS

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift):
    """s' = k s / (1 + (k - 1) s): with k > 1 more steps are spent at high noise, where structure forms."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_timesteps(num_steps, shift):
    """num_steps + 1 noise levels from exactly 1 down to exactly 0, shifted; float64 for exact endpoints.

    The plain grid for rollouts that step the ODE themselves; `denoise` uses the schedulers' own grids.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    if shift <= 0:
        raise ConfigError(f"shift must be positive, got {shift!r}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), float(shift))


def make_scheduler(sampler: str, shift: float):
    """A fresh diffusers scheduler for flow prediction with timestep shift `shift` (they keep per-run state).

    euler: FlowMatchEulerDiscreteScheduler (first order); unipc: UniPCMultistepScheduler with flow sigmas,
    order 2, bh2, as diffusers' WanPipeline is configured (it converts the predicted velocity to x0 = x - s v
    and integrates in that parameterisation).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or shift <= 0:
        raise ConfigError(f"shift must be a positive number, got {shift!r}")
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(shift))
    if sampler == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=float(shift),
            solver_order=2,
        )
    raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


@torch.no_grad()
def denoise(velocity, noise, num_steps=50, shift=5.0, sampler="unipc", progress=False):
    """Integrate the flow from s = 1 (x = noise) to s = 0; return float32 latents.

    velocity(latents [B, C, T, H, W] float32, timestep [B] float32 in 0..1000) -> v like latents (guidance
    already applied, see guidance.py). The scheduler's timesteps are passed as they are (UniPC's are integers,
    as in diffusers' WanPipeline); its step does the update, always on float32 latents and velocities.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    scheduler = make_scheduler(sampler, shift)
    scheduler.set_timesteps(num_steps, device=noise.device)
    scheduler.set_begin_index(0)
    latents = noise.float()
    timesteps = scheduler.timesteps
    if progress:
        from tqdm import tqdm

        timesteps = tqdm(timesteps, desc=f"sampling ({sampler})", unit="step", leave=False)
    for t in timesteps:
        timestep = t.to(torch.float32).expand(latents.shape[0])
        v = velocity(latents, timestep).float()
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents.float()


def sample_flow(
    velocity_fn,
    noise,
    text_states,
    null_text_states=None,
    num_steps=50,
    shift=5.0,
    guidance_scale=5.0,
    sampler="unipc",
    progress=False,
):
    """denoise() with classifier-free guidance batched into one model call per step.

    velocity_fn(latents, timestep [B], text_states [B, L, D]) -> v; null_text_states: [B or 1, L, D] states of
    the negative prompt (None disables guidance).
    """
    from osp_megatron.inference.guidance import BatchedGuidance

    if text_states.shape[0] != noise.shape[0]:
        raise ConfigError(f"text_states batch {text_states.shape[0]} does not match the noise batch {noise.shape[0]}")
    guided = BatchedGuidance(velocity_fn, text_states, null_text_states, guidance_scale)
    return denoise(guided, noise, num_steps, shift, sampler, progress)
