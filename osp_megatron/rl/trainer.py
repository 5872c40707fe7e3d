"""osp-grpo's iteration: prompts -> grouped rollouts -> decoded videos -> rewards -> advantages -> learner steps.

Data-parallel over samples (a group may span ranks; its statistics are gathered), sequence/tensor parallel
inside each sample through the model's own layouts, sharded by FSDP when parallel.fsdp is set; the model,
checkpoints, resume, stops, samples and telemetry come from the engine's job loop (engine/loop.py).
"""

import time

import numpy as np
import torch
import torch.distributed as dist

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.loop import TrainingJob
from osp_megatron.engine.lora import adapters_disabled
from osp_megatron.engine.model import build_job_model
from osp_megatron.engine.optim import average_gradients, clip_gradients, lr_at, set_lr
from osp_megatron.engine.rng import seed_everything
from osp_megatron.inference.runner import build_pipeline, render_sample
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import reshard
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.rl.learner import group_advantages, reward_permutation, transition_loss
from osp_megatron.rl.policy import check_encoders_match, initial_policy_weights
from osp_megatron.rl.prompts import build_prompt_set
from osp_megatron.rl.reward_ranks import RewardClient
from osp_megatron.rl.rewards import build_rewards, reward_weights, score_videos, to_uint8_frames
from osp_megatron.rl.rollout import RolloutBatch, rollout, seeded_generator
from osp_megatron.rl.schedule import ode_plan, rollout_plan, window_start

# The key of the evaluation's noise streams: never an iteration number.
EVAL_STREAM = 2**31 - 1


class GRPOTrainer(TrainingJob):
    """Build everything from a GRPOJobConfig, resume if asked, then `train()` for train.steps iterations."""

    name = "osp-grpo"
    render = staticmethod(render_sample)
    unit = "iteration"
    progress_keys = ("reward", "eval_reward", "samples_per_s")

    def __init__(self, config):
        # The policy's layout over all ranks but the last grpo.reward_ranks.
        super().__init__(config, reserved_ranks=config.grpo.reward_ranks)
        grpo = config.grpo
        self.samples_per_iteration = grpo.prompts_per_iteration * grpo.group_size
        if self.samples_per_iteration % (self.dp_size * grpo.updates_per_iteration):
            raise ConfigError(
                f"grpo.prompts_per_iteration x grpo.group_size = {self.samples_per_iteration} samples must divide "
                f"evenly over {self.dp_size} data-parallel ranks x grpo.updates_per_iteration="
                f"{grpo.updates_per_iteration} minibatches"
            )
        self.local_samples = self.samples_per_iteration // self.dp_size
        which = "ema" if config.checkpoint.load_ema else "model"
        # A resumed checkpoint holds every trained weight; the initial policy is still needed as the frozen
        # reference of full fine-tuning (kl_coef > 0), and as the base of a LoRA policy, which a resume finds
        # through the checkpoint's reference.
        needs_initial = self.resume_path is None or (grpo.kl_coef > 0 and config.lora is None)
        initial = initial_policy_weights(config) if needs_initial else None
        if initial is not None:
            check_encoders_match(config, initial)
        if self.resume_path is None and initial is None and config.lora is not None:
            raise ConfigError("lora adapts a trained policy: set checkpoint.load to it")
        self.build_trained_model(initial, which)
        self.reference = None
        if grpo.kl_coef > 0 and config.lora is None:
            # Full fine-tuning keeps the initial policy apart (built and sharded like the policy, frozen);
            # with LoRA it is the base weights with the adapters off.
            # Without checkpoint.load the initial policy is the fresh model of train.seed: drawn again alike.
            seed_everything(config.train.seed)
            self.reference = build_job_model(config, self.device, "frozen", weights=initial, which=which)
        self.pipeline = build_pipeline(self.model, config, self.device)
        sample = config.sample
        self.latent_shape = self.pipeline.latent_shape(sample.num_frames, sample.height, sample.width)
        grid = tuple(size // patch for size, patch in zip(self.latent_shape[1:], config.model.patch_size))
        check_sequence_parallel_layout(
            config.model,
            grid,
            config.parallel.tensor,
            config.parallel.ssp,
            config.parallel.ulysses,
            source="token grid of sample.num_frames/height/width",
        )
        self.prompts = build_prompt_set(config.prompts, config.model, lambda: self.pipeline.text_encoder)
        self.reward_client = None
        if grpo.reward_ranks:
            # The reward models live on the reward ranks; here only their names and weights are needed.
            self.rewards = reward_weights(grpo.rewards)
            self.reward_client = RewardClient(config, self.device, len(self.rewards))
        else:
            self.rewards = build_rewards(grpo.rewards, self.device, video_fps=sample.fps)
        self.resume()
        if self.resume_path is None and initial is not None:
            self.say(f"initialised the policy from {initial}")
        self.initial_eval_reward = None

    def velocity(self, latents, timestep, text_states):
        return self.model(latents, timestep, text_states)

    def reference_velocity(self, latents, timestep, text_states):
        """The frozen initial policy: the base model with adapters off (LoRA), or the kept copy."""
        if self.built.lora is not None:
            with adapters_disabled(self.model):
                return self.model(latents, timestep, text_states)
        return self.reference.module(latents, timestep, text_states)

    # -- one iteration ---------------------------------------------------------------------------------
    def plan(self, iteration: int):
        grpo = self.config.grpo
        start = window_start(
            iteration,
            grpo.num_steps,
            grpo.window_size,
            grpo.window_mode,
            grpo.window_shift_interval,
            grpo.window_stride,
            grpo.window_offset,
        )
        return rollout_plan(
            grpo.num_steps, self.config.sample.shift, start, grpo.window_size, grpo.flash, grpo.flash_stride
        )

    def local_sample_ids(self) -> range:
        return range(self.dp_rank * self.local_samples, (self.dp_rank + 1) * self.local_samples)

    def roll_out(self, prompt_ids: list[int], noise_keys: list[tuple], sde_keys: list[tuple], plan) -> RolloutBatch:
        """Roll out one sample per entry in micro-batches: prompt_ids[j] with initial noise drawn from
        noise_keys[j] and SDE noise from sde_keys[j], so a sample's trajectory does not depend on where it runs."""
        cfg = self.config
        null = None
        if cfg.sample.guidance_scale != 1.0:
            null = self.prompts.null_states(cfg.sample.negative_prompt).to(self.device)
        batches = []
        micro = cfg.train.micro_batch_size
        for first in range(0, len(prompt_ids), micro):
            rows = range(first, min(first + micro, len(prompt_ids)))
            noise = torch.stack(
                [torch.randn(self.latent_shape, generator=seeded_generator(*noise_keys[j])) for j in rows]
            ).to(self.device)
            text = self.prompts.states([prompt_ids[j] for j in rows]).to(self.device)
            generators = [seeded_generator(*sde_keys[j]) for j in rows]
            batches.append(
                rollout(
                    self.velocity,
                    noise,
                    text,
                    null,
                    plan,
                    cfg.grpo.eta,
                    cfg.sample.guidance_scale,
                    generators,
                    self.autocast,
                )
            )
        return RolloutBatch.concatenate(batches)

    def collect(self, iteration: int, plan) -> tuple[RolloutBatch, list[int]]:
        """This rank's samples of an iteration; sample k belongs to prompt slot k // group_size, whose samples
        share one initial noise drawn from (seed, iteration, slot)."""
        seed, group = self.config.train.seed, self.config.grpo.group_size
        slot_prompts = self.prompts.indices_for_iteration(iteration, self.config.grpo.prompts_per_iteration, seed)
        ids = list(self.local_sample_ids())
        prompt_ids = [slot_prompts[k // group] for k in ids]
        batch = self.roll_out(
            prompt_ids, [(seed, iteration, k // group) for k in ids], [(seed, iteration, k, 1) for k in ids], plan
        )
        return batch, prompt_ids

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean rewards of deterministic (all-ODE) samples of grpo.eval_prompts fixed prompts with fixed noise:
        comparable across iterations, unlike the rollouts' rewards (other prompts, SDE noise)."""
        cfg, count = self.config, self.config.grpo.eval_prompts
        seed = cfg.grpo.eval_seed  # not train.seed: runs with different seeds are scored alike
        chosen = np.random.default_rng([seed, EVAL_STREAM]).permutation(len(self.prompts))[:count].tolist()
        mine = list(range(self.dp_rank, len(chosen), self.dp_size))
        real = len(mine)
        if self.built.fsdp:
            # Every forward gathers the sharded weights with all data ranks: each rank renders as many videos
            # (the ranks with fewer repeat their first one and leave the repeats out of the means).
            mine += mine[:1] * (-(-len(chosen) // self.dp_size) - real)
        sums = torch.zeros(len(self.rewards) + 1, dtype=torch.float64)
        if mine:
            plan = ode_plan(cfg.grpo.num_steps, cfg.sample.shift)
            batch = self.roll_out(
                [chosen[j] for j in mine],
                [(seed, EVAL_STREAM, j) for j in mine],
                [(seed, EVAL_STREAM, j, 1) for j in mine],
                plan,
            )
            scores = self.score(batch, [chosen[j] for j in mine]).double()[:real]
            sums[:-1], sums[-1] = scores.sum(dim=0), real
        elif self.reward_client is not None:
            self.reward_client.empty_round()
        if self.dp_size > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums, group=state.data_parallel_group())
        means = (sums[:-1] / sums[-1]).cpu()
        weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)
        result = {"eval_reward": float((means * weights).sum())}
        for reward, mean in zip(self.rewards, means):
            result[f"eval_reward/{reward.name}"] = float(mean)
        return result

    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompt_ids: list[int]) -> torch.Tensor:
        """Rewards [local samples, rewards]: decode grpo.decode_batch_size videos at a time, score them together
        here or on the reward ranks."""
        size = self.config.grpo.decode_batch_size
        videos = torch.cat(
            [
                to_uint8_frames(self.pipeline.vae.decode(batch.final_latents[first : first + size]))
                for first in range(0, len(batch.final_latents), size)
            ]
        )
        if self.reward_client is not None:
            return self.reward_client.score(videos, prompt_ids)
        return score_videos(self.rewards, videos, [self.prompts.prompts[i] for i in prompt_ids])

    def gather_scores(self, local: torch.Tensor) -> torch.Tensor:
        """Every data-parallel rank's scores in sample order: [samples_per_iteration, rewards]."""
        if self.dp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.dp_size)]
        device_local = local.to(self.device)
        device_parts = [p.to(self.device) for p in parts]
        dist.all_gather(device_parts, device_local, group=state.data_parallel_group())
        return torch.cat([p.cpu() for p in device_parts])

    def learn(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict:
        """updates_per_iteration optimizer steps, each over a minibatch of samples and every window step."""
        cfg, grpo = self.config, self.config.grpo
        null = None
        if cfg.sample.guidance_scale != 1.0:
            null = self.prompts.null_states(cfg.sample.negative_prompt).to(self.device)
        reference = self.reference_velocity if grpo.kl_coef > 0 else None
        module, optimizer = self.model, self.optimizer
        lr = lr_at(self.step, cfg.train)
        set_lr(optimizer, lr)
        module.train()
        minibatch = self.local_samples // grpo.updates_per_iteration
        micro = cfg.train.micro_batch_size
        ratios, clipped, kls, losses, norms = [], [], [], [], []
        for start in range(0, self.local_samples, minibatch):
            optimizer.zero_grad(set_to_none=True)
            pieces = [
                (first, min(first + micro, start + minibatch)) for first in range(start, start + minibatch, micro)
            ]
            scale = len(batch.transitions) * minibatch
            for first, last in pieces:
                rows = slice(first, last)
                for transition in batch.transitions:
                    step = transition_loss(
                        self.velocity,
                        transition.select(rows),
                        batch.text_states[rows],
                        null,
                        advantages[rows],
                        grpo.eta,
                        cfg.sample.guidance_scale,
                        grpo.clip_range,
                        grpo.kl_coef,
                        reference,
                        self.autocast,
                    )
                    # Mean over this minibatch's samples and window steps, whatever the micro-batch size.
                    (step.loss * (last - first) / scale).backward()
                    losses.append(float(step.loss.detach()) * (last - first) / scale)
                    ratios.append(step.ratio)
                    clipped.append(step.clipped)
                    kls.append(step.kl)
            if not self.built.fsdp:  # FSDP's reduce-scatter over the same ranks takes this mean
                average_gradients(
                    module, state.gradient_reduction_group(), dist.get_world_size(state.gradient_reduction_group())
                )
            norms.append(float(clip_gradients(module, cfg.train.grad_clip)))
            optimizer.step()
            if self.ema is not None:
                self.ema.update(module)
        ratio, clip_hits, kl = torch.cat(ratios), torch.cat(clipped).float(), torch.cat(kls)
        means = torch.stack(
            [
                ratio.mean(),
                clip_hits.mean(),
                kl.mean(),
                torch.tensor(sum(losses) / grpo.updates_per_iteration, device=ratio.device),
            ]
        )
        means, deviation = means.to(self.device), (ratio - 1).abs().max().to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(means, group=state.data_parallel_group())
            means /= self.dp_size
            dist.all_reduce(deviation, op=dist.ReduceOp.MAX, group=state.data_parallel_group())
        ratio_mean, clip_fraction, kl_mean, loss = means.tolist()
        ratio_deviation = float(deviation)
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": sum(norms) / len(norms),
            "policy_ratio": ratio_mean,
            "policy_ratio_max_deviation": ratio_deviation,
            "clip_fraction": clip_fraction,
            "kl": kl_mean,
        }

    def train_iteration(self) -> dict:
        grpo = self.config.grpo
        plan = self.plan(self.step)
        tick = time.time()
        self.model.eval()
        batch, prompt_ids = self.collect(self.step, plan)
        reshard(self.model)  # forward-only passes leave FSDP's root parameters gathered
        local_scores = self.score(batch, prompt_ids)
        rollout_seconds = time.time() - tick
        scores = self.gather_scores(local_scores)
        weights = [reward.weight for reward in self.rewards]
        trained_scores = scores
        if grpo.shuffle_rewards:
            # Every sample's rewards move together to another sample: advantages of the same sizes, no signal.
            trained_scores = scores[reward_permutation(len(scores), self.config.train.seed, self.step)]
        advantages = group_advantages(trained_scores, grpo.group_size, weights, grpo.advantage_clip)
        local_advantages = advantages[self.local_sample_ids().start : self.local_sample_ids().stop].to(self.device)
        tick = time.time()
        metrics = self.learn(batch, local_advantages)
        learner_seconds = time.time() - tick
        guidance_factor = 1 if self.config.sample.guidance_scale == 1.0 else 2
        metrics.update(
            reward=float((scores * torch.tensor(weights)).sum(dim=1).mean()),
            advantage_mean=float(advantages.mean()),
            advantage_std=float(advantages.std(unbiased=False)),
            advantage_abs_max=float(advantages.abs().max()),
            nfe_per_sample=plan.model_evaluations * guidance_factor,
            window_start=plan.sde_steps[0],
            rollout_s=rollout_seconds,
            learner_s=learner_seconds,
        )
        for column, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.name}_mean"] = float(scores[:, column].mean())
            metrics[f"reward/{reward.name}_std"] = float(scores[:, column].std(unbiased=False))
        return metrics

    # -- what the job loop asks ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        metrics = self.train_iteration()
        metrics["samples"] = self.samples_per_iteration
        return metrics

    def evaluation_due(self, step: int) -> bool:
        every = self.config.grpo.eval_interval
        return bool(every) and (step % every == 0 or step == self.config.train.steps)

    def evaluate_before_training(self) -> dict | None:
        if not self.config.grpo.eval_interval:
            return None
        initial = self.evaluate()
        self.initial_eval_reward = initial["eval_reward"]
        self.message(f"evaluation reward before training: {initial['eval_reward']:.4f}")
        return initial

    def describe(self) -> str:
        return (
            f"{len(self.prompts)} prompts; {self.samples_per_iteration} samples per iteration over "
            f"{self.dp_size} data-parallel ranks"
        )

    def finish_message(self, result: dict) -> str | None:
        if "eval_reward" not in result:
            return None
        before = f"{self.initial_eval_reward:.4f} -> " if self.initial_eval_reward is not None else ""
        return f"evaluation reward {before}{result['eval_reward']:.4f} after {result['step']} iterations"

    def close(self) -> None:
        if self.reward_client is not None:
            self.reward_client.close()
