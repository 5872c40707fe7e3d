"""Tests of the flow-matching samplers: convergence on a field with a known solution, guidance, shift, and
agreement with diffusers' WanPipeline driving the same tiny transformer.
"""

import copy

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.guidance import BatchedGuidance
from osp_megatron.inference.sampler import SAMPLERS, denoise, flow_timesteps, make_scheduler, sample_flow


class GaussianFlow:
    """Exact velocity of the flow from N(0, 1) (s = 1) to data N(mu, c^2) (s = 0) along x_s = (1-s) x0 + s eps.

    Marginals stay Gaussian with mean (1-s) mu and variance V(s) = (1-s)^2 c^2 + s^2, so the flow map is
    x_s = (1-s) mu + sqrt(V(s)) z and v(x, s) = -mu + (s - (1-s) c^2) / V(s) (x - (1-s) mu): linear in x, curved
    in s, and it ends at x_0 = mu + c z. Evaluated in float64 at the solver's own noise levels: the loop hands
    the model the scheduler's (possibly integer) timesteps, and the field is looked up at the matching sigma.
    """

    def __init__(self, sampler, num_steps, shift, mu, c):
        scheduler = make_scheduler(sampler, shift)
        scheduler.set_timesteps(num_steps)
        self.sigmas = scheduler.sigmas[:-1].double()
        self.timesteps = scheduler.timesteps.float()
        self.mu, self.c, self.calls = mu, c, 0

    def __call__(self, x, timestep):
        index = self.calls
        self.calls += 1
        assert torch.equal(timestep, self.timesteps[index].expand(x.shape[0]))
        s = self.sigmas[index]
        variance = (1 - s) ** 2 * self.c**2 + s**2
        x = x.double()
        return -self.mu + (s - (1 - s) * self.c**2) / variance * (x - (1 - s) * self.mu)


def _solve(sampler, num_steps, shift=3.0, mu=0.7, c=0.4):
    noise = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    field = GaussianFlow(sampler, num_steps, shift, mu, c)
    out = denoise(field, noise, num_steps, shift, sampler)
    assert field.calls == num_steps
    return (out.double() - (mu + c * noise.double())).abs().max().item()


def test_samplers_converge_to_the_exact_solution_at_their_order():
    """Without shift, Euler halves its error when the steps double (order 1) and UniPC (order 2 multistep) cuts
    it by more than 3x; at Wan's shift 5 and 50 steps UniPC is still several times more accurate than Euler."""
    errors = {sampler: [_solve(sampler, n, shift=1.0) for n in (25, 50, 100)] for sampler in SAMPLERS}
    ratios = {sampler: [a / b for a, b in zip(e, e[1:])] for sampler, e in errors.items()}
    assert all(1.8 < ratio < 2.2 for ratio in ratios["euler"]), errors
    assert all(ratio > 3.0 for ratio in ratios["unipc"]), errors
    assert errors["unipc"][-1] < 1e-3 and errors["euler"][-1] < 0.02
    assert _solve("unipc", 50, shift=5.0) < 0.25 * _solve("euler", 50, shift=5.0)


def test_scheduler_grids_follow_the_shift():
    """Every sampler starts at s = 1 (to 1e-6), ends at exactly 0 and spends longer at high noise with more shift."""
    for sampler in SAMPLERS:
        low, high = make_scheduler(sampler, 1.0), make_scheduler(sampler, 5.0)
        low.set_timesteps(10)
        high.set_timesteps(10)
        assert abs(float(high.sigmas[0]) - 1.0) < 1e-5 and float(high.sigmas[-1]) == 0.0
        assert torch.all(high.sigmas[1:-1] > low.sigmas[1:-1])
        assert torch.all(high.sigmas[1:] < high.sigmas[:-1])


def test_flow_timesteps_are_the_exact_shifted_grid():
    """flow_timesteps: levels from exactly 1 to exactly 0 under s' = k s / (1 + (k - 1) s)."""
    torch.testing.assert_close(flow_timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert flow_timesteps(2, 3.0)[1].item() == pytest.approx(0.75)


def test_guidance_batches_both_halves_and_extrapolates():
    """With g != 1 one call holds cond and uncond (2B) and the step uses v_u + g (v_c - v_u); g = 1 makes one
    [B] call with the conditional states only."""
    calls = []
    text, null = torch.full((2, 4, 3), 2.0), torch.zeros(1, 4, 3)

    def velocity_fn(x, t, c):
        calls.append(c.clone())
        return torch.ones_like(x) * c.mean(dim=(1, 2))[:, None, None, None, None]

    latents, timestep = torch.zeros(2, 1, 1, 1, 1), torch.full((2,), 500.0)
    v = BatchedGuidance(velocity_fn, text, null, 3.0)(latents, timestep)
    assert len(calls) == 1 and calls[0].shape == (4, 4, 3) and torch.equal(calls[0][2:], torch.zeros(2, 4, 3))
    torch.testing.assert_close(v, torch.full((2, 1, 1, 1, 1), 6.0))  # 0 + 3 * (2 - 0)
    calls.clear()
    v = BatchedGuidance(velocity_fn, text, null, 1.0)(latents, timestep)
    assert len(calls) == 1 and calls[0].shape == (2, 4, 3)
    torch.testing.assert_close(v, torch.full((2, 1, 1, 1, 1), 2.0))


def test_euler_with_constant_velocity_lands_on_noise_minus_velocity():
    """Through sample_flow: with v constant the Euler sum of steps is exactly x0 = x1 - v, for any shift."""
    noise, velocity = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    for steps, shift in [(1, 1.0), (7, 5.0)]:
        out = sample_flow(lambda x, t, c: velocity, noise, torch.zeros(2, 3, 4), None, steps, shift, 1.0, "euler")
        torch.testing.assert_close(out, noise - velocity, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_config_errors():
    """An unknown sampler, zero steps, a non-positive shift or a negative guidance scale are refused by name."""
    field = lambda x, t, c: x  # noqa: E731
    args = (torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 2, 3), None)
    with pytest.raises(ConfigError, match="sampler"):
        sample_flow(field, *args, 2, 1.0, 1.0, "heun")
    with pytest.raises(ConfigError, match="num_steps"):
        sample_flow(field, *args, 0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="shift"):
        sample_flow(field, *args, 2, 0.0, 1.0)
    with pytest.raises(ConfigError, match="guidance_scale"):
        sample_flow(field, *args, 2, 1.0, -1.0)


# -- agreement with diffusers' WanPipeline --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory, single_rank_device):
    """(diffusers model, our DiT with the same weights, its folder) of one tiny random WanTransformer3DModel."""
    from osp_megatron.checkpointing.pretrained import load_pretrained
    from osp_megatron.testing import random_diffusers_wan

    reference = random_diffusers_wan(seed=5)
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    reference.save_pretrained(folder)
    return reference, load_pretrained(folder, attention_backend="math").eval(), folder


def _pipeline_latents(reference, sampler, noise, text, null, steps, shift, guidance, dtype):
    from diffusers import WanPipeline

    from osp_megatron.models.vae import tiny_wan_vae

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=make_scheduler(sampler, shift),
        transformer=reference.to(dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=text.to(dtype),
        negative_prompt_embeds=null.to(dtype),
        height=8 * noise.shape[3],
        width=8 * noise.shape[4],
        num_frames=4 * noise.shape[2] - 3,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise.clone(),
        output_type="latent",
        return_dict=False,
    )[0]
    return out.float()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_denoising_loop_matches_diffusers_wan_pipeline(tiny_wan, sampler):
    """Same weights, scheduler settings, noise and prompt states as WanPipeline: driving diffusers' own transformer,
    our loop reproduces the pipeline's final latents exactly; with our DiT holding the converted weights it agrees
    to float32 round-off, and within bf16 tolerance when both sides hold every weight in bf16."""
    from osp_megatron.checkpointing.pretrained import load_pretrained

    reference, model, folder = tiny_wan
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 4, 2, 4, 4, generator=generator)
    text, null = torch.randn(2, 7, 16, generator=generator), torch.randn(2, 7, 16, generator=generator)
    expected = _pipeline_latents(reference, sampler, noise, text, null, 5, 3.0, 4.0, torch.float32)

    def diffusers_velocity(x, t, c):
        return reference(x, t, c, return_dict=False)[0]

    separate = lambda x, t: BatchedGuidance(diffusers_velocity, text, null, 4.0)(x, t)  # noqa: E731
    torch.testing.assert_close(denoise(separate, noise, 5, 3.0, sampler), expected, atol=1e-5, rtol=1e-6)
    ours = denoise(BatchedGuidance(model, text, null, 4.0), noise, 5, 3.0, sampler)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)

    low_reference = copy.deepcopy(reference)
    low_model = load_pretrained(folder, dtype="bfloat16", attention_backend="math").eval()
    expected = _pipeline_latents(low_reference, sampler, noise, text, null, 5, 3.0, 4.0, torch.bfloat16)
    velocity = lambda x, t, c: low_model(x.bfloat16(), t, c.bfloat16())  # noqa: E731
    ours = denoise(BatchedGuidance(velocity, text, null, 4.0), noise, 5, 3.0, sampler)
    assert (ours - expected).norm() < 0.03 * expected.norm()
