"""GRPO rollouts: sample a batch of videos' latents along a RolloutPlan, recording the SDE window's transitions.

ODE and flash steps run without gradient and keep nothing; each SDE step keeps (x_i, x_{i+1}, log pi_old).
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from osp_megatron.inference.guidance import BatchedGuidance
from osp_megatron.inference.sampler import NUM_TRAIN_TIMESTEPS
from osp_megatron.rl.schedule import RolloutPlan
from osp_megatron.rl.sde import SecondOrderSolver, ode_step, sde_step


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose stream depends only on `keys` (seed, iteration, sample, ...), not on the rank."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


@dataclass
class Transition:
    """One recorded SDE step of a batch: x_i -> x_{i+1} between noise levels sigma -> sigma_next."""

    step: int
    sigma: float
    sigma_next: float
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_prob: torch.Tensor  # [B] under the rollout (old) policy

    def select(self, rows) -> "Transition":
        return Transition(
            self.step, self.sigma, self.sigma_next, self.latents[rows], self.next_latents[rows], self.log_prob[rows]
        )


@dataclass
class RolloutBatch:
    final_latents: torch.Tensor
    text_states: torch.Tensor
    transitions: list[Transition] = field(default_factory=list)

    def select(self, rows) -> "RolloutBatch":
        return RolloutBatch(
            self.final_latents[rows], self.text_states[rows], [t.select(rows) for t in self.transitions]
        )

    @staticmethod
    def concatenate(batches: list["RolloutBatch"]) -> "RolloutBatch":
        transitions = []
        for parts in zip(*(b.transitions for b in batches)):
            first = parts[0]
            transitions.append(
                Transition(
                    first.step,
                    first.sigma,
                    first.sigma_next,
                    torch.cat([p.latents for p in parts]),
                    torch.cat([p.next_latents for p in parts]),
                    torch.cat([p.log_prob for p in parts]),
                )
            )
        return RolloutBatch(
            torch.cat([b.final_latents for b in batches]), torch.cat([b.text_states for b in batches]), transitions
        )


def timesteps(sigma: float, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), sigma * NUM_TRAIN_TIMESTEPS, device=device)


@torch.no_grad()
def rollout(
    velocity_fn,
    noise: torch.Tensor,
    text_states: torch.Tensor,
    null_states,
    plan: RolloutPlan,
    eta: float,
    guidance_scale: float,
    sde_generators: list[torch.Generator],
    autocast=None,
) -> RolloutBatch:
    """Integrate from `noise` (s = 1) to s = 0 along `plan`; velocity_fn(latents, timestep, text) is the policy.

    sde_generators: one per sample, drawing that sample's SDE noise, so a sample's trajectory does not
    depend on which rank or micro-batch runs it. null_states: the negative prompt's states (guidance).
    """
    latents = noise.float()
    batch = RolloutBatch(final_latents=latents, text_states=text_states)
    solver = SecondOrderSolver()
    guided = BatchedGuidance(velocity_fn, text_states, null_states, guidance_scale)
    sigmas = [float(s) for s in plan.sigmas]
    for i, kind in enumerate(plan.kinds):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        with (autocast or contextlib.nullcontext)():
            velocity = guided(latents, timesteps(sigma, latents.shape[0], latents.device)).float()
        if kind == "sde":
            step_noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in sde_generators])
            next_latents, log_prob = sde_step(latents, velocity, sigma, sigma_next, eta, step_noise.to(latents.device))
            batch.transitions.append(Transition(i, sigma, sigma_next, latents, next_latents, log_prob))
        elif kind == "flash":
            next_latents = solver.step(latents, velocity, sigma, sigma_next)
        else:
            next_latents = ode_step(latents, velocity, sigma, sigma_next)
        latents = next_latents
    batch.final_latents = latents
    return batch
