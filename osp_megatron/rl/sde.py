"""Stochastic and deterministic steps of the rectified-flow sampler used by GRPO rollouts and the learner.

The SDE step (docs/grpo.md) turns the flow ODE into a Gaussian transition with a known log-density.
"""

import torch

from osp_megatron.config.errors import ConfigError


def _per_sample(value, reference: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] noise level as a float64 tensor broadcastable against `reference` [B, ...]."""
    value = torch.as_tensor(value, dtype=torch.float64, device=reference.device)
    if value.dim() == 0:
        value = value.expand(reference.shape[0])
    if value.shape != (reference.shape[0],):
        raise ConfigError(f"sigma must be a scalar or have shape [{reference.shape[0]}], got {tuple(value.shape)}")
    return value.view(-1, *([1] * (reference.dim() - 1)))


def sde_mean_and_std(latents, velocity, sigma, sigma_next, eta):
    """(mean, std) of x' given x at noise level s stepping to s_next: x' ~ N(mean, std^2) per element.

    std_s = eta sqrt(s / (1 - s)) (at s = 1 the denominator uses s_next, which is finite); the mean is
    x + [v + std_s^2 / (2 s) (x + (1 - s) v)] dt and the transition std is std_s sqrt(|dt|). Coefficients are
    computed in float64, the result in float32.
    """
    s, s_next = _per_sample(sigma, latents), _per_sample(sigma_next, latents)
    if bool(((s <= 0) | (s > 1)).any()) or bool((s_next >= s).any()) or bool((s_next < 0).any()):
        raise ConfigError("SDE step needs 1 >= sigma > sigma_next >= 0")
    dt = s_next - s
    denominator = torch.where(s >= 1, 1 - s_next, 1 - s)
    std_s = eta * torch.sqrt(s / denominator)
    x, v = latents.float(), velocity.float()
    drift = v + (std_s**2 / (2 * s)).float() * (x + (1 - s).float() * v)
    mean = x + drift * dt.float()
    return mean, (std_s * torch.sqrt(-dt)).float()


def gaussian_log_prob(next_latents, mean, std) -> torch.Tensor:
    """log N(next_latents; mean, std^2) averaged over all non-batch elements -> [B] float32."""
    x = next_latents.float()
    log_density = (
        -((x - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - 0.5 * torch.log(torch.tensor(2 * torch.pi, device=x.device))
    )
    return log_density.flatten(1).mean(dim=1)


def sde_step(latents, velocity, sigma, sigma_next, eta, noise):
    """One SDE step from noise level sigma to sigma_next -> (next_latents, log_prob [B]).

    latents, velocity, noise: [B, ...]; sigma, sigma_next: scalars or [B]; eta: the noise level (~0.7).
    next_latents = mean + std sqrt(|dt|) noise; log_prob is its Gaussian log-density averaged over elements.
    """
    mean, std = sde_mean_and_std(latents, velocity, sigma, sigma_next, eta)
    next_latents = mean + std * noise.float()
    return next_latents, gaussian_log_prob(next_latents, mean, std)


def sde_log_prob(latents, velocity, next_latents, sigma, sigma_next, eta) -> torch.Tensor:
    """The log-probability [B] of a recorded transition latents -> next_latents under `velocity` (the learner's)."""
    mean, std = sde_mean_and_std(latents, velocity, sigma, sigma_next, eta)
    return gaussian_log_prob(next_latents.detach(), mean, std)


def sde_kl(mean, reference_mean, std) -> torch.Tensor:
    """KL between two Gaussian transitions of equal std, averaged over elements -> [B]."""
    return (((mean - reference_mean) ** 2) / (2 * std**2)).flatten(1).mean(dim=1)


def ode_step(latents, velocity, sigma, sigma_next):
    """Euler step of the flow ODE dx/ds = v: x + (s_next - s) v (float32)."""
    s, s_next = _per_sample(sigma, latents), _per_sample(sigma_next, latents)
    return latents.float() + ((s_next - s).float() * velocity.float())


class SecondOrderSolver:
    """Second-order multistep ODE solver (DPM-Solver++(2M) in data-prediction form) for the flow x_s = (1-s) x0 + s n.

    Each step costs one velocity evaluation: the previous step's x0 estimate gives the second-order term, so a
    grid of half the points reaches the accuracy Euler needs the full grid for. The first step and the final
    step onto s = 0 are first order (the log-SNR is infinite there).
    """

    def __init__(self):
        self.previous = None  # (x0 estimate, log-SNR step h) of the last step

    @staticmethod
    def _log_snr(s: float) -> float:
        return float(torch.log(torch.tensor((1 - s) / s, dtype=torch.float64)))

    def step(self, latents, velocity, sigma: float, sigma_next: float):
        x, v = latents.float(), velocity.float()
        x0 = x - sigma * v
        if sigma_next <= 0:
            self.previous = None
            return x0
        h = self._log_snr(sigma_next) - self._log_snr(sigma)
        direction = x0
        if self.previous is not None:
            previous_x0, previous_h = self.previous
            ratio = previous_h / h
            direction = (1 + 1 / (2 * ratio)) * x0 - 1 / (2 * ratio) * previous_x0
        self.previous = (x0, h)
        decay = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()
        return (sigma_next / sigma) * x - (1 - sigma_next) * decay * direction
