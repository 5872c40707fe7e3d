"""Rectified-flow training objective with logit-normal, shifted timestep sampling (Wan2.1 / SD3 style).

x_s = (1 - s) x0 + s eps, target v = eps - x0, loss = MSE(model(x_s, 1000 s, text), v).
"""

from dataclasses import dataclass

import numpy as np
import torch


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = k s / (1 + (k - 1) s): k > 1 moves mass toward noise, as higher resolutions need."""
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device=None,
) -> torch.Tensor:
    """Logit-normal noise levels s in (0, 1), shifted; drawn on the CPU generator for reproducibility."""
    normal = torch.randn(batch, generator=generator) * logit_std + logit_mean
    return shift_sigma(torch.sigmoid(normal), shift).to(device)


def sample_seed(seed: int, sample_index: int) -> int:
    """The 64-bit generator seed of one training sample: a hash of (train.seed, global sample index)."""
    return int(np.random.SeedSequence([int(seed), int(sample_index)]).generate_state(1, np.uint64)[0])


@dataclass
class PerSampleNoise:
    """Noise and noise level of every sample drawn from its own generator, seeded by (seed, sample index).

    A sample's draws then do not depend on which rank, micro-batch or position in a batch it lands in, so a
    global batch trains the same at any data-parallel size and accumulation. The generator lives on the
    latents' device: on a GPU, seeding a Philox generator only sets a key (no state to fill) and the noise is
    drawn by one kernel straight into GPU memory (a 480P latent holds 2.1M values), so the per-sample loop
    adds two small kernel launches per sample to a step of seconds.
    """

    seed: int
    sample_indices: torch.Tensor  # int64 [batch]: positions of the samples in the global sample stream

    def draw(self, latents: torch.Tensor, shift: float, logit_mean: float, logit_std: float):
        """(noise like latents, sigmas [batch] float32)."""
        if len(self.sample_indices) != latents.shape[0]:
            raise ValueError(f"{len(self.sample_indices)} sample indices for a batch of {latents.shape[0]}")
        normals, noises = [], []
        for index in self.sample_indices.tolist():
            generator = torch.Generator(device=latents.device).manual_seed(sample_seed(self.seed, index))
            normals.append(torch.randn(1, generator=generator, device=latents.device))
            noises.append(torch.randn(latents.shape[1:], generator=generator, device=latents.device))
        sigmas = shift_sigma(torch.sigmoid(torch.cat(normals) * logit_std + logit_mean), shift)
        return torch.stack(noises).to(latents.dtype), sigmas


def draw_noise(
    source: torch.Generator | PerSampleNoise, latents: torch.Tensor, shift: float, logit_mean: float, logit_std: float
):
    """(noise, sigmas) for a micro-batch from per-sample generators, or from one CPU generator's stream."""
    if isinstance(source, PerSampleNoise):
        return source.draw(latents, shift, logit_mean, logit_std)
    sigmas = sample_sigmas(latents.shape[0], source, shift, logit_mean, logit_std, latents.device)
    noise = torch.randn(latents.shape, generator=source).to(latents.device, latents.dtype)
    return noise, sigmas


def flow_matching_losses(
    model,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    noise_source: torch.Generator | PerSampleNoise,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
):
    """(per-sample mean squared velocity error [B], noise levels s [B]) of one micro-batch; noise and
    timesteps come from `noise_source`."""
    noise, sigmas = draw_noise(noise_source, latents, shift, logit_mean, logit_std)
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    target = noise - latents
    prediction = model(noisy, sigmas * 1000.0, text_states)
    errors = (prediction.float() - target.float()).pow(2)
    return errors.flatten(1).mean(dim=1), sigmas


def flow_matching_loss(
    model,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    noise_source: torch.Generator | PerSampleNoise,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
):
    """Mean squared velocity error of one micro-batch (every sample has the same size, so the mean of the
    per-sample means)."""
    losses, _ = flow_matching_losses(model, latents, text_states, noise_source, shift, logit_mean, logit_std)
    return losses.mean()
