"""Tests of the rectified-flow Euler sampler: exact integration, the shift schedule and guidance.

Velocity fields here are closed-form, so the expected result is known exactly.
"""

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.sampler import flow_timesteps, sample_flow


def _text(batch=2, length=4, dim=3):
    return torch.randn(batch, length, dim)


def test_constant_velocity_gives_noise_minus_velocity():
    """With v constant, integrating from s=1 to 0 gives x0 = x1 - v for any step count and shift."""
    noise, velocity = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    for num_steps, shift in [(1, 1.0), (7, 5.0), (20, 3.0)]:
        out = sample_flow(lambda x, t, c: velocity, noise, _text(), None, num_steps, shift, 1.0, progress=False)
        torch.testing.assert_close(out, noise - velocity, atol=1e-5, rtol=1e-5)


def test_ideal_velocity_of_a_point_reaches_the_point_exactly():
    """For data concentrated at x0 the true field v = (x - x0) / s is linear along straight paths,
    so Euler steps land on x0 exactly; the model sees timestep = 1000 s."""
    target, noise = torch.randn(1, 2, 1, 3, 3), torch.randn(1, 2, 1, 3, 3)
    out = sample_flow(lambda x, t, c: (x - target) / (t / 1000.0)[:, None, None, None, None], noise, _text(1),
                      None, num_steps=6, shift=5.0, guidance_scale=1.0, progress=False)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)


def test_timesteps_passed_to_the_model_are_1000_times_the_shifted_levels():
    """The model is called once per step with timestep [B] = 1000 s_i, starting at 1000."""
    seen = []

    def velocity_fn(x, t, c):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample_flow(velocity_fn, torch.zeros(3, 1, 1, 1, 1), _text(3), None, 5, 3.0, 1.0, progress=False)
    expected = (flow_timesteps(5, 3.0)[:-1] * 1000).float()
    assert torch.allclose(torch.stack([t[0] for t in seen]), expected)
    assert all(t.shape == (3,) for t in seen) and seen[0][0] == 1000.0


def test_shift_schedule_is_monotone_with_exact_endpoints():
    """Levels fall strictly from exactly 1 to exactly 0; shift 1 is linear and larger shifts stay noisier longer."""
    for shift in (1.0, 3.0, 5.0, 7.0):
        sigmas = flow_timesteps(50, shift)
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 51
        assert torch.all(sigmas[1:] < sigmas[:-1])
    torch.testing.assert_close(flow_timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.all(flow_timesteps(10, 5.0)[1:-1] > flow_timesteps(10, 2.0)[1:-1])
    # s' = k s / (1 + (k - 1) s) at s = 0.5, k = 3 is 0.75
    assert flow_timesteps(2, 3.0)[1].item() == pytest.approx(0.75)


def test_guidance_scale_one_equals_the_conditional_model_in_one_unbatched_call():
    """g = 1 gives the conditional-only result and never evaluates the negative prompt."""
    batches = []

    def velocity_fn(x, t, c):
        batches.append(x.shape[0])
        return x * 0.1 + c.mean(dim=(1, 2))[:, None, None, None, None]

    noise, text, null = torch.randn(2, 1, 2, 2, 2), _text(), _text()
    guided = sample_flow(velocity_fn, noise, text, null, 4, 5.0, guidance_scale=1.0, progress=False)
    plain = sample_flow(velocity_fn, noise, text, None, 4, 5.0, guidance_scale=5.0, progress=False)
    torch.testing.assert_close(guided, plain)
    assert set(batches) == {2}


def test_guidance_batches_both_halves_and_extrapolates():
    """With g != 1 one call holds cond and uncond (2B), and the step uses v_u + g (v_c - v_u)."""
    calls = []
    text, null = torch.full((2, 4, 3), 2.0), torch.zeros(1, 4, 3)

    def velocity_fn(x, t, c):
        calls.append(c.clone())
        return torch.ones_like(x) * c.mean(dim=(1, 2))[:, None, None, None, None]

    noise = torch.zeros(2, 1, 1, 1, 1)
    out = sample_flow(velocity_fn, noise, text, null, num_steps=1, shift=1.0, guidance_scale=3.0, progress=False)
    assert len(calls) == 1 and calls[0].shape == (4, 4, 3)
    assert torch.equal(calls[0][2:], torch.zeros(2, 4, 3))
    # v_c = 2, v_u = 0 -> v = 0 + 3 * 2 = 6; one step of ds = -1 from 0 gives -6
    torch.testing.assert_close(out, torch.full((2, 1, 1, 1, 1), -6.0))


def test_bad_arguments_are_config_errors():
    """Zero steps, a non-positive shift or a negative guidance scale are refused."""
    with pytest.raises(ConfigError, match="num_steps"):
        flow_timesteps(0, 5.0)
    with pytest.raises(ConfigError, match="shift"):
        flow_timesteps(10, 0.0)
    with pytest.raises(ConfigError, match="guidance_scale"):
        sample_flow(lambda x, t, c: x, torch.zeros(1, 1, 1, 1, 1), _text(1), None, 2, 1.0, -1.0, progress=False)
