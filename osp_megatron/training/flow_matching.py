"""Rectified-flow training objective with logit-normal, shifted timestep sampling (Wan2.1 / SD3 style).

x_s = (1 - s) x0 + s eps, target v = eps - x0, loss = MSE(model(x_s, 1000 s, text), v).
"""

import torch


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = k s / (1 + (k - 1) s): k > 1 moves mass toward noise, as higher resolutions need."""
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(batch: int, generator: torch.Generator, shift: float = 1.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0, device=None) -> torch.Tensor:
    """Logit-normal noise levels s in (0, 1), shifted; drawn on the CPU generator for reproducibility."""
    normal = torch.randn(batch, generator=generator) * logit_std + logit_mean
    return shift_sigma(torch.sigmoid(normal), shift).to(device)


def flow_matching_losses(model, latents: torch.Tensor, text_states: torch.Tensor, generator: torch.Generator,
                         shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0):
    """(per-sample mean squared velocity error [B], noise levels s [B]) of one micro-batch; noise and
    timesteps come from `generator`."""
    sigmas = sample_sigmas(latents.shape[0], generator, shift, logit_mean, logit_std, latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    target = noise - latents
    prediction = model(noisy, sigmas * 1000.0, text_states)
    errors = (prediction.float() - target.float()).pow(2)
    return errors.flatten(1).mean(dim=1), sigmas


def flow_matching_loss(model, latents: torch.Tensor, text_states: torch.Tensor, generator: torch.Generator,
                       shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0):
    """Mean squared velocity error of one micro-batch (every sample has the same size, so the mean of the
    per-sample means)."""
    losses, _ = flow_matching_losses(model, latents, text_states, generator, shift, logit_mean, logit_std)
    return losses.mean()
