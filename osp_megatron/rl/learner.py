"""The GRPO learner: group-normalised advantages and the clipped-ratio loss of one recorded SDE step.

Per trained step: r = exp(log pi_theta - log pi_old), L = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) + beta KL
(docs/grpo.md); the KL is to the frozen reference policy's transition.
"""

import contextlib
from dataclasses import dataclass

import torch

from osp_megatron.inference.guidance import BatchedGuidance
from osp_megatron.rl.rollout import Transition, seeded_generator, timesteps
from osp_megatron.rl.sde import gaussian_log_prob, sde_kl, sde_mean_and_std

ADVANTAGE_EPS = 1e-8
# The key of the reward shuffle's stream: apart from the (seed, iteration, group) keys of the initial noise.
SHUFFLE_STREAM = 2**31 - 2


def group_advantages(scores: torch.Tensor, group_size: int, weights, clip: float) -> torch.Tensor:
    """Advantages [N] of scores [N, R] (N samples, consecutive groups of `group_size`, R rewards).

    Each reward is normalised inside its group, (r - mean) / (std + 1e-8), before the weighted sum, so a
    reward's scale does not decide its influence; the sum is clipped to [-clip, clip].
    """
    scores = scores.double()
    if scores.dim() == 1:
        scores = scores[:, None]
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not form whole groups of {group_size}")
    grouped = scores.view(-1, group_size, scores.shape[1])
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    normalised = (grouped - mean) / (std + ADVANTAGE_EPS)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    combined = (normalised * weights).sum(dim=-1).reshape(-1)
    return combined.clamp(-clip, clip).float()


def reward_permutation(samples: int, seed: int, iteration: int) -> torch.Tensor:
    """The order in which grpo.shuffle_rewards hands an iteration's scores to its samples: drawn from
    (seed, iteration) alone, so every rank and a resumed run shuffle alike."""
    return torch.randperm(samples, generator=seeded_generator(seed, iteration, SHUFFLE_STREAM))


@dataclass
class StepLoss:
    loss: torch.Tensor  # scalar, with gradient
    ratio: torch.Tensor  # [B], detached
    clipped: torch.Tensor  # [B] bool: the clipped term was the active one
    kl: torch.Tensor  # [B], detached


def transition_loss(
    velocity_fn,
    transition: Transition,
    text_states,
    null_states,
    advantages,
    eta: float,
    guidance_scale: float,
    clip_range: float,
    kl_coef: float = 0.0,
    reference_velocity_fn=None,
    autocast=None,
) -> StepLoss:
    """The clipped-ratio loss (plus kl_coef x KL) of one recorded transition under the current policy."""
    context = autocast or contextlib.nullcontext
    latents = transition.latents
    t = timesteps(transition.sigma, latents.shape[0], latents.device)
    with context():
        velocity = BatchedGuidance(velocity_fn, text_states, null_states, guidance_scale)(latents, t).float()
    mean, std = sde_mean_and_std(latents, velocity, transition.sigma, transition.sigma_next, eta)
    log_prob = gaussian_log_prob(transition.next_latents, mean, std)
    ratio = torch.exp(log_prob - transition.log_prob)
    advantages = advantages.to(ratio.device)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros_like(ratio)
    if kl_coef > 0 and reference_velocity_fn is not None:
        with torch.no_grad(), context():
            reference = BatchedGuidance(reference_velocity_fn, text_states, null_states, guidance_scale)(
                latents, t
            ).float()
        reference_mean, _ = sde_mean_and_std(latents, reference, transition.sigma, transition.sigma_next, eta)
        kl = sde_kl(mean, reference_mean, std)
        loss = loss + kl_coef * kl.mean()
    return StepLoss(loss, ratio.detach(), (clipped > unclipped).detach(), kl.detach())
