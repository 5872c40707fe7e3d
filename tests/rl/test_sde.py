"""The SDE step, its log-probability, the KL and the ODE solvers against float64 references."""

import math

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.rl import sde_log_prob, sde_step
from osp_megatron.rl.sde import SecondOrderSolver, ode_step, sde_kl, sde_mean_and_std


def reference_step(x, v, s, s_next, eta, noise, sigma_at_one_uses):
    """docs/grpo.md's SDE step written out in float64, one sample at a time."""
    x, v, noise = x.double(), v.double(), noise.double()
    dt = s_next - s
    std = eta * math.sqrt(s / (1 - (sigma_at_one_uses if s == 1 else s)))
    mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * math.sqrt(-dt)
    nxt = mean + scale * noise
    log_density = -((nxt - mean) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi)
    return nxt, log_density.mean(), mean, scale


@pytest.mark.parametrize("s, s_next", [(0.8, 0.7), (1.0, 0.9), (0.3, 0.0)])
def test_sde_step_matches_float64_reference(s, s_next):
    """next latents and log-prob equal the section-5 formulas (at s = 1 the denominator uses s_next)."""
    generator = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 2, 5, 6, generator=generator) for _ in range(3))
    nxt, log_prob = sde_step(x, v, s, s_next, 0.7, noise)
    for b in range(3):
        ref_next, ref_log_prob, _, _ = reference_step(x[b], v[b], s, s_next, 0.7, noise[b], s_next)
        torch.testing.assert_close(nxt[b].double(), ref_next, rtol=1e-5, atol=1e-5)
        assert log_prob[b].item() == pytest.approx(ref_log_prob.item(), rel=1e-5, abs=1e-5)
    assert log_prob.shape == (3,)


def test_per_sample_sigmas_and_scoring_sibling():
    """[B] sigmas equal per-sample scalar calls; sde_log_prob scores a recorded step exactly as sde_step did,
    and a transition the mean does not explain scores lower."""
    generator = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3))
    sigma, sigma_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.3])
    nxt, log_prob = sde_step(x, v, sigma, sigma_next, 0.5, noise)
    for b in range(2):
        one, one_lp = sde_step(x[b : b + 1], v[b : b + 1], float(sigma[b]), float(sigma_next[b]), 0.5, noise[b : b + 1])
        torch.testing.assert_close(nxt[b : b + 1], one)
        torch.testing.assert_close(log_prob[b : b + 1], one_lp)
    torch.testing.assert_close(sde_log_prob(x, v, nxt, sigma, sigma_next, 0.5), log_prob)
    assert (sde_log_prob(x, v + 1.0, nxt, sigma, sigma_next, 0.5) < log_prob).all()


def test_kl_of_equal_variance_gaussians():
    """sde_kl equals the closed form |mu1 - mu0|^2 / (2 std^2), averaged over elements, and is 0 for one policy."""
    generator = torch.Generator().manual_seed(2)
    x, v, w = (torch.randn(2, 3, 4, generator=generator) for _ in range(3))
    mean, std = sde_mean_and_std(x, v, 0.6, 0.5, 0.7)
    other, _ = sde_mean_and_std(x, w, 0.6, 0.5, 0.7)
    expected = ((mean.double() - other.double()) ** 2 / (2 * std.double() ** 2)).flatten(1).mean(1)
    torch.testing.assert_close(sde_kl(mean, other, std).double(), expected, rtol=1e-5, atol=1e-7)
    assert sde_kl(mean, mean, std).abs().max() == 0


def test_bad_sigmas_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="sigma"):
        sde_step(x, x, 0.5, 0.6, 0.7, x)
    with pytest.raises(ConfigError, match="shape"):
        sde_step(x, x, torch.tensor([0.5, 0.4]), 0.3, 0.7, x)


def test_second_order_solver_converges_at_second_order():
    """On a curved flow (velocity of a Gaussian data set) halving the step divides the flash solver's error
    by about 4 and Euler's by about 2; both end exactly at x0 for a straight flow."""
    data_std = 0.5

    def velocity(x, s):  # exact velocity of x_s = (1 - s) x0 + s n with x0 ~ N(0, data_std^2), n ~ N(0, 1)
        variance = (1 - s) ** 2 * data_std**2 + s**2
        return x * (s - (1 - s) * data_std**2) / variance

    def solve(steps, second_order):
        x = torch.ones(1, dtype=torch.float64) * 1.3
        sigmas = torch.linspace(1.0, 0.1, steps + 1, dtype=torch.float64).tolist()
        solver = SecondOrderSolver()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(x, s)
            x = solver.step(x, v, s, s_next).double() if second_order else ode_step(x, v, s, s_next).double()
        return x

    exact = solve(4096, True)
    flash = [float((solve(n, True) - exact).abs()) for n in (32, 64)]
    euler = [float((solve(n, False) - exact).abs()) for n in (32, 64)]
    assert flash[0] / flash[1] > 3.0 and euler[0] / euler[1] < 2.6
    assert flash[1] < euler[1] / 5
    x0, noise = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    solver, x = SecondOrderSolver(), noise.clone()
    for s, s_next in ((1.0 - 1e-6, 0.6), (0.6, 0.2), (0.2, 0.0)):
        x = solver.step(x, noise - x0, s, s_next).double()
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)  # float32 inside the solver
