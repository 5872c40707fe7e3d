"""Classifier-free guidance v = v_u + g (v_c - v_u): both passes batched on one rank, or split over two ranks.

The split form runs the conditional pass on CFG rank 0 and the unconditional one on rank 1, then one all-gather.
"""

import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError


def check_guidance_scale(scale) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
        raise ConfigError(f"guidance_scale must be a number >= 0 (1 disables guidance), got {scale!r}")
    return float(scale)


def _pad_tokens(states, length):
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[1]))


class BatchedGuidance:
    """Conditional and unconditional halves in one [2B] call (one [B] call when g = 1 or no negative states)."""

    def __init__(self, velocity_fn, text_states, null_text_states, guidance_scale):
        self.velocity_fn = velocity_fn
        self.scale = check_guidance_scale(guidance_scale)
        self.text_states = text_states
        self.guided = self.scale != 1.0 and null_text_states is not None
        if self.guided:
            if null_text_states.shape[0] == 1 and text_states.shape[0] > 1:
                null_text_states = null_text_states.expand(text_states.shape[0], -1, -1)
            length = max(null_text_states.shape[1], text_states.shape[1])
            null_text_states = _pad_tokens(null_text_states.to(text_states.dtype), length)
            self.text_states = torch.cat([_pad_tokens(text_states, length), null_text_states])

    def __call__(self, latents, timestep):
        if not self.guided:
            return self.velocity_fn(latents, timestep, self.text_states)
        velocity = self.velocity_fn(torch.cat([latents, latents]), torch.cat([timestep, timestep]), self.text_states)
        conditional, unconditional = velocity.float().chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


class ParallelGuidance:
    """One of two CFG ranks: rank 0 evaluates the prompt, rank 1 the negative prompt, on the same latents.

    `own_text_states` are this rank's half. Both ranks receive both velocities (one all-gather of latent size
    per step) and combine them identically, so their latents stay equal bit for bit.
    """

    def __init__(self, velocity_fn, own_text_states, guidance_scale, group):
        self.velocity_fn = velocity_fn
        self.text_states = own_text_states
        self.scale = check_guidance_scale(guidance_scale)
        self.group = group

    def __call__(self, latents, timestep):
        velocity = self.velocity_fn(latents, timestep, self.text_states).float().contiguous()
        both = [torch.empty_like(velocity) for _ in range(2)]
        dist.all_gather(both, velocity, group=self.group)
        conditional, unconditional = both
        return unconditional + self.scale * (conditional - unconditional)
