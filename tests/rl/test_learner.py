"""Rollouts and the learner: a full window is plain SDE sampling, gradients come only from window steps,
advantages normalise each reward per group, and the clipped ratio loss behaves as section 5 says."""

import pytest
import torch

from osp_megatron.inference.guidance import BatchedGuidance
from osp_megatron.rl import sde_step
from osp_megatron.rl.learner import group_advantages, transition_loss
from osp_megatron.rl.rollout import rollout, seeded_generator
from osp_megatron.rl.schedule import rollout_plan


def _inputs(batch=2):
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(batch, 16, 2, 4, 4, generator=generator)
    text = torch.randn(batch, 32, 32, generator=generator)
    return noise, text, torch.zeros(1, 32, 32)


def test_full_window_is_plain_sde_sampling(tiny_model):
    """A window over all T steps gives exactly the chain of sde_step calls with the same per-sample noise."""
    noise, text, null = _inputs()
    plan = rollout_plan(4, shift=2.0, start=0, window_size=4)
    batch = rollout(tiny_model, noise, text, null, plan, 0.7, 2.0, [seeded_generator(1, k) for k in range(2)])
    generators = [seeded_generator(1, k) for k in range(2)]
    x, log_probs = noise.clone(), []
    sigmas = plan.sigmas.tolist()
    with torch.no_grad():
        for i in range(4):
            v = BatchedGuidance(tiny_model, text, null, 2.0)(x, torch.full((2,), sigmas[i] * 1000))
            step_noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
            x, log_prob = sde_step(x, v, sigmas[i], sigmas[i + 1], 0.7, step_noise)
            log_probs.append(log_prob)
    torch.testing.assert_close(batch.final_latents, x, rtol=0, atol=0)
    assert [t.step for t in batch.transitions] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.stack([t.log_prob for t in batch.transitions]), torch.stack(log_probs))


def test_gradients_reach_the_model_only_through_window_steps(tiny_model):
    """The rollout runs every step without gradient; the learner evaluates the model with gradient exactly at
    the window's steps, and the recorded tensors carry no graph."""
    noise, text, null = _inputs()
    calls = []

    def recording(latents, timestep, text_states):
        calls.append((round(float(timestep[0]) / 1000, 6), torch.is_grad_enabled()))
        return tiny_model(latents, timestep, text_states)

    plan = rollout_plan(6, shift=1.0, start=2, window_size=2)
    batch = rollout(recording, noise, text, null, plan, 0.7, 2.0, [seeded_generator(2, k) for k in range(2)])
    assert len(calls) == 6 and not any(grad for _, grad in calls)
    assert not any(t.latents.requires_grad or t.next_latents.requires_grad for t in batch.transitions)
    calls.clear()
    tiny_model.zero_grad(set_to_none=True)
    for transition in batch.transitions:
        transition_loss(recording, transition, text, null, torch.tensor([1.0, -1.0]), 0.7, 2.0, 1e-4).loss.backward()
    window_sigmas = [round(float(s), 6) for s in plan.sigmas[2:4]]
    assert calls == [(s, True) for s in window_sigmas]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_advantages_normalise_each_reward_inside_its_group():
    """Two rewards of very different scales count equally after per-group normalisation; groups are independent;
    the weighted sum is clipped."""
    scores = torch.tensor([[1.0, 100.0], [3.0, 300.0], [0.0, 5.0], [0.0, 1.0]])
    advantages = group_advantages(scores, group_size=2, weights=[1.0, 0.5], clip=5.0)
    torch.testing.assert_close(advantages, torch.tensor([-1.5, 1.5, 0.5, -0.5]))
    flat = group_advantages(torch.tensor([[2.0], [2.0]]), 2, [1.0], 5.0)
    assert flat.abs().max() == 0  # equal rewards: no signal, no division by zero
    spiky = group_advantages(torch.tensor([0.0] * 99 + [1.0]), 100, [1.0], clip=5.0)
    assert spiky.max() == 5.0  # (1 - 0.01) / 0.0995 = 9.95 before clipping
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(3, 1), 2, [1.0], 5.0)


def test_clipped_ratio_loss():
    """On-policy the ratio is 1 and the loss is -mean(A); a ratio beyond 1 + eps with A > 0 is clipped, so
    its gradient vanishes, while with A < 0 the unclipped term stays active."""
    weight = torch.nn.Parameter(torch.tensor(0.3))

    def velocity(latents, timestep, text_states):
        return weight * latents

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batch = rollout(
            velocity,
            x,
            torch.zeros(2, 1, 1),
            None,
            rollout_plan(2, 1.0, 0, 1),
            0.7,
            1.0,
            [seeded_generator(5, k) for k in range(2)],
        )
    transition = batch.transitions[0]
    advantages = torch.tensor([1.0, -1.0])
    step = transition_loss(velocity, transition, None, None, advantages, 0.7, 1.0, clip_range=1e-3)
    torch.testing.assert_close(step.ratio, torch.ones(2))
    assert step.loss.item() == pytest.approx(0.0, abs=1e-6) and not step.clipped.any()
    transition.log_prob = transition.log_prob - 0.1  # the old policy liked these transitions less: ratio e^0.1
    positive = transition_loss(velocity, transition.select([0]), None, None, advantages[:1], 0.7, 1.0, 1e-3)
    assert positive.clipped.all()
    (grad,) = torch.autograd.grad(positive.loss, weight)
    assert grad == 0
    negative = transition_loss(velocity, transition.select([1]), None, None, advantages[1:], 0.7, 1.0, 1e-3)
    assert not negative.clipped.any() and torch.autograd.grad(negative.loss, weight)[0] != 0


def test_kl_is_zero_against_itself_and_positive_otherwise(tiny_model):
    noise, text, null = _inputs()
    plan = rollout_plan(3, shift=1.0, start=1, window_size=1)
    batch = rollout(tiny_model, noise, text, null, plan, 0.7, 2.0, [seeded_generator(6, k) for k in range(2)])
    args = (batch.transitions[0], text, null, torch.ones(2), 0.7, 2.0, 1e-4)
    same = transition_loss(tiny_model, *args, kl_coef=0.1, reference_velocity_fn=tiny_model)
    assert same.kl.abs().max() < 1e-10
    other = transition_loss(
        tiny_model, *args, kl_coef=0.1, reference_velocity_fn=lambda x, t, c: tiny_model(x, t, c) + 0.1
    )
    assert (other.kl > 0).all() and other.loss > same.loss


def test_first_update_is_on_policy_and_a_step_follows_the_advantage(make_tiny_model):
    """Rollout and learner agree: with guidance (g = 3) and eta = 0.7 in float32, the learner's log-probability of
    every recorded transition equals the rollout's (ratio 1 to 1e-6). The loss points the right way: one small
    gradient step on a sample with advantage +1 raises the log-probability of its transitions, with -1 lowers it."""
    model = make_tiny_model()
    noise, text, null = _inputs()
    plan = rollout_plan(4, shift=1.0, start=0, window_size=4)
    batch = rollout(model, noise, text, null, plan, 0.7, 3.0, [seeded_generator(7, k) for k in range(2)])
    for transition in batch.transitions:
        step = transition_loss(model, transition, text, null, torch.ones(2), 0.7, 3.0, 1e-3)
        assert (step.ratio - 1).abs().max() < 1e-6
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    sample = batch.select([0])
    for sign in (1.0, -1.0):
        model.load_state_dict(initial, strict=False)
        model.zero_grad(set_to_none=True)
        advantage = torch.tensor([sign])
        for transition in sample.transitions:
            transition_loss(model, transition, text[:1], null, advantage, 0.7, 3.0, 1e-3).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad
        with torch.no_grad():
            log_ratio = torch.stack(
                [
                    transition_loss(model, t, text[:1], null, advantage, 0.7, 3.0, 1e-3).ratio.log()
                    for t in sample.transitions
                ]
            ).mean()
        assert sign * log_ratio > 1e-6, (sign, float(log_ratio))
