"""Euler sampler for rectified flow with timestep shift and classifier-free guidance.

Convention shared with training: x_s = (1 - s) x0 + s noise, the model predicts v = noise - x0 at timestep 1000 s.
"""

import torch

from osp_megatron.config.errors import ConfigError

TIMESTEP_SCALE = 1000.0


def shift_sigmas(sigmas, shift):
    """s' = k s / (1 + (k - 1) s): with k > 1 more steps are spent at high noise, where structure forms."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_timesteps(num_steps, shift):
    """num_steps + 1 noise levels from exactly 1 down to exactly 0, shifted; float64 for exact endpoints."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}")
    if shift <= 0:
        raise ConfigError(f"shift must be positive, got {shift!r}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), float(shift))


def guided_velocity(velocity_fn, latents, timestep, text_states, null_text_states, guidance_scale):
    """v_uncond + g (v_cond - v_uncond), evaluating both halves in one batched call (one call when g = 1)."""
    if guidance_scale == 1.0 or null_text_states is None:
        return velocity_fn(latents, timestep, text_states)
    if null_text_states.shape[0] == 1 and text_states.shape[0] > 1:
        null_text_states = null_text_states.expand(text_states.shape[0], -1, -1)
    if null_text_states.shape[1] != text_states.shape[1]:
        length = max(null_text_states.shape[1], text_states.shape[1])
        text_states, null_text_states = _pad_tokens(text_states, length), _pad_tokens(null_text_states, length)
    velocity = velocity_fn(torch.cat([latents, latents]), torch.cat([timestep, timestep]),
                           torch.cat([text_states, null_text_states.to(text_states.dtype)]))
    conditional, unconditional = velocity.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _pad_tokens(states, length):
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[1]))


@torch.no_grad()
def sample_flow(velocity_fn, noise, text_states, null_text_states=None, num_steps=50, shift=5.0, guidance_scale=5.0,
                progress=True):
    """Integrate dx/ds = v from s = 1 (x = noise) to s = 0 with Euler steps; return the float32 latents.

    velocity_fn(latents [B, C, T, H, W], timestep [B] = 1000 s, text_states [B, L, D]) -> v like latents.
    null_text_states: [B or 1, L, D] states of the negative prompt; None disables guidance.
    """
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
    if text_states.shape[0] != noise.shape[0]:
        raise ConfigError(f"text_states batch {text_states.shape[0]} does not match the noise batch {noise.shape[0]}")
    sigmas = flow_timesteps(num_steps, shift)
    latents = noise.float()
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="step")
    for i in steps:
        sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
        timestep = torch.full((latents.shape[0],), sigma * TIMESTEP_SCALE, device=latents.device)
        velocity = guided_velocity(velocity_fn, latents, timestep, text_states, null_text_states, guidance_scale)
        latents = latents + (next_sigma - sigma) * velocity.float()
    return latents
