"""The osp-grpo loop: prompts -> grouped rollouts -> decoded videos -> rewards -> advantages -> learner steps.

Data-parallel over samples (a group may span ranks; its statistics are gathered), sequence/tensor parallel
inside each sample through the model's own layouts; checkpoints, resume and telemetry as in osp-train.
"""

import contextlib
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from osp_megatron.checkpointing.checkpoint import resume_target
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import to_dict
from osp_megatron.inference.runner import build_pipeline
from osp_megatron.parallel import state
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.rl.learner import group_advantages, transition_loss
from osp_megatron.rl.policy import Policy, check_encoders_match, resolve_weights_path, run_pretraining
from osp_megatron.rl.prompts import build_prompt_set
from osp_megatron.rl.reward_ranks import RewardClient
from osp_megatron.rl.rewards import build_rewards, reward_weights, score_videos, to_uint8_frames
from osp_megatron.rl.rollout import RolloutBatch, rollout, seeded_generator
from osp_megatron.rl.schedule import ode_plan, rollout_plan, window_start
from osp_megatron.training.metrics import MetricsLogger
from osp_megatron.training.optim import average_gradients, clip_gradients, lr_at, set_lr
from osp_megatron.training.signals import GracefulStop
from osp_megatron.training.trainer import rng_state, seed_everything, set_rng_state, training_device


# The key of the evaluation's noise streams: never an iteration number.
EVAL_STREAM = 2**31 - 1


class GRPOTrainer:
    """Build everything from a GRPOJobConfig, resume if asked, then `train()` for train.steps iterations."""

    def __init__(self, config):
        self.config = config
        # The policy's layout over all ranks but the last grpo.reward_ranks.
        self.device = training_device(config, reserved_ranks=config.grpo.reward_ranks)
        self.run_dir = Path(config.run.dir)
        self.logging_rank = state.is_logging_rank()
        self.dp_rank, self.dp_size = state.data_parallel_rank(), state.data_parallel_size()
        grpo = config.grpo
        self.samples_per_iteration = grpo.prompts_per_iteration * grpo.group_size
        if self.samples_per_iteration % (self.dp_size * grpo.updates_per_iteration):
            raise ConfigError(
                f"grpo.prompts_per_iteration x grpo.group_size = {self.samples_per_iteration} samples must divide "
                f"evenly over {self.dp_size} data-parallel ranks x grpo.updates_per_iteration="
                f"{grpo.updates_per_iteration} minibatches")
        self.local_samples = self.samples_per_iteration // self.dp_size
        self.precision = config.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"

        resume = self._resume_path()
        # A resumed checkpoint holds every weight; only full fine-tuning's reference still needs the initial ones.
        needs_initial = resume is None or (config.grpo.kl_coef > 0 and config.grpo.lora is None)
        initial = self._initial_weights() if needs_initial else None
        seed_everything(config.train.seed)
        self.policy = Policy(config, self.device, initial)
        self.pipeline = build_pipeline(self.policy.module, config, self.device)
        sample = config.sample
        self.latent_shape = self.pipeline.latent_shape(sample.num_frames, sample.height, sample.width)
        grid = tuple(size // patch for size, patch in zip(self.latent_shape[1:], config.model.patch_size))
        check_sequence_parallel_layout(config.model, grid, config.parallel.tensor, config.parallel.ssp,
                                       config.parallel.ulysses, source="token grid of sample.num_frames/height/width")
        self.prompts = build_prompt_set(config.prompts, config.model, lambda: self.pipeline.text_encoder)
        self.reward_client = None
        if grpo.reward_ranks:
            # The reward models live on the reward ranks; here only their names and weights are needed.
            self.rewards = reward_weights(grpo.rewards)
            self.reward_client = RewardClient(config, self.device, len(self.rewards))
        else:
            self.rewards = build_rewards(grpo.rewards, self.device, video_fps=sample.fps)
        self.iteration = 0
        if resume is not None:
            rank_state = self.policy.load(resume)
            self.iteration = int(rank_state["step"])
            set_rng_state(rank_state["rng"])
            self._say(f"resumed from {resume} at iteration {self.iteration}")
        elif initial is not None:
            self._say(f"initialised the policy from {initial}")

    # -- set-up ----------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.logging_rank:
            print(f"[osp-grpo] {text}", flush=True)

    def _resume_path(self) -> Optional[Path]:
        return resume_target(self.config.checkpoint.resume, self.run_dir, say=self._say)

    def _initial_weights(self) -> Optional[Path]:
        """checkpoint.load resolved to a checkpoint, pretraining it first when grpo.pretrain_if_missing says so."""
        load = self.config.checkpoint.load
        if load is None:
            return None
        if not Path(load).exists():
            recipe = self.config.grpo.pretrain_if_missing
            if recipe is None:
                raise ConfigError(f"checkpoint.load={load!r} does not exist; point it at a pretraining run or "
                                  "checkpoint, or set grpo.pretrain_if_missing=tiny to create it")
            if dist.get_rank() == 0:
                run_pretraining(recipe, load)
            dist.barrier()
        weights = resolve_weights_path(load)
        check_encoders_match(self.config, weights)
        return weights

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one iteration ---------------------------------------------------------------------------------
    def plan(self, iteration: int):
        grpo = self.config.grpo
        start = window_start(iteration, grpo.num_steps, grpo.window_size, grpo.window_mode,
                             grpo.window_shift_interval, grpo.window_stride)
        return rollout_plan(grpo.num_steps, self.config.sample.shift, start, grpo.window_size, grpo.flash,
                            grpo.flash_stride)

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
            noise = torch.stack([torch.randn(self.latent_shape, generator=seeded_generator(*noise_keys[j]))
                                 for j in rows]).to(self.device)
            text = self.prompts.states([prompt_ids[j] for j in rows]).to(self.device)
            generators = [seeded_generator(*sde_keys[j]) for j in rows]
            batches.append(rollout(self.policy.velocity, noise, text, null, plan, cfg.grpo.eta,
                                   cfg.sample.guidance_scale, generators, self._autocast))
        return RolloutBatch.concatenate(batches)

    def collect(self, iteration: int, plan) -> tuple[RolloutBatch, list[int]]:
        """This rank's samples of an iteration; sample k belongs to prompt slot k // group_size, whose samples
        share one initial noise drawn from (seed, iteration, slot)."""
        seed, group = self.config.train.seed, self.config.grpo.group_size
        slot_prompts = self.prompts.indices_for_iteration(iteration, self.config.grpo.prompts_per_iteration, seed)
        ids = list(self.local_sample_ids())
        prompt_ids = [slot_prompts[k // group] for k in ids]
        batch = self.roll_out(prompt_ids, [(seed, iteration, k // group) for k in ids],
                              [(seed, iteration, k, 1) for k in ids], plan)
        return batch, prompt_ids

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean rewards of deterministic (all-ODE) samples of grpo.eval_prompts fixed prompts with fixed noise:
        comparable across iterations, unlike the rollouts' rewards (other prompts, SDE noise)."""
        cfg, count = self.config, self.config.grpo.eval_prompts
        seed = cfg.grpo.eval_seed  # not train.seed: runs with different seeds are scored alike
        chosen = np.random.default_rng([seed, EVAL_STREAM]).permutation(len(self.prompts))[:count].tolist()
        mine = list(range(self.dp_rank, len(chosen), self.dp_size))
        sums = torch.zeros(len(self.rewards) + 1, dtype=torch.float64)
        if mine:
            plan = ode_plan(cfg.grpo.num_steps, cfg.sample.shift)
            batch = self.roll_out([chosen[j] for j in mine], [(seed, EVAL_STREAM, j) for j in mine],
                                  [(seed, EVAL_STREAM, j, 1) for j in mine], plan)
            scores = self.score(batch, [chosen[j] for j in mine]).double()
            sums[:-1], sums[-1] = scores.sum(dim=0), len(mine)
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
        videos = torch.cat([to_uint8_frames(self.pipeline.vae.decode(batch.final_latents[first:first + size]))
                            for first in range(0, len(batch.final_latents), size)])
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
        reference = self.policy.reference_velocity if grpo.kl_coef > 0 else None
        module, optimizer = self.policy.module, self.policy.optimizer
        lr = lr_at(self.iteration, cfg.train)
        set_lr(optimizer, lr)
        module.train()
        minibatch = self.local_samples // grpo.updates_per_iteration
        micro = cfg.train.micro_batch_size
        ratios, clipped, kls, losses, norms = [], [], [], [], []
        for start in range(0, self.local_samples, minibatch):
            optimizer.zero_grad(set_to_none=True)
            pieces = [(first, min(first + micro, start + minibatch)) for first in range(start, start + minibatch, micro)]
            scale = len(batch.transitions) * minibatch
            for first, last in pieces:
                rows = slice(first, last)
                for transition in batch.transitions:
                    step = transition_loss(self.policy.velocity, transition.select(rows), batch.text_states[rows],
                                           null, advantages[rows], grpo.eta, cfg.sample.guidance_scale,
                                           grpo.clip_range, grpo.kl_coef, reference, self._autocast)
                    # Mean over this minibatch's samples and window steps, whatever the micro-batch size.
                    (step.loss * (last - first) / scale).backward()
                    losses.append(float(step.loss.detach()) * (last - first) / scale)
                    ratios.append(step.ratio)
                    clipped.append(step.clipped)
                    kls.append(step.kl)
            average_gradients(module, state.gradient_reduction_group(),
                              dist.get_world_size(state.gradient_reduction_group()))
            norms.append(float(clip_gradients(module, cfg.train.grad_clip)))
            optimizer.step()
            if self.policy.ema is not None:
                self.policy.ema.update(module)
        ratio, clip_hits, kl = torch.cat(ratios), torch.cat(clipped).float(), torch.cat(kls)
        means = torch.stack([ratio.mean(), clip_hits.mean(), kl.mean(),
                             torch.tensor(sum(losses) / grpo.updates_per_iteration, device=ratio.device)])
        means, deviation = means.to(self.device), (ratio - 1).abs().max().to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(means, group=state.data_parallel_group())
            means /= self.dp_size
            dist.all_reduce(deviation, op=dist.ReduceOp.MAX, group=state.data_parallel_group())
        ratio_mean, clip_fraction, kl_mean, loss = means.tolist()
        ratio_deviation = float(deviation)
        return {"loss": loss, "lr": lr, "grad_norm": sum(norms) / len(norms), "policy_ratio": ratio_mean,
                "policy_ratio_max_deviation": ratio_deviation, "clip_fraction": clip_fraction, "kl": kl_mean}

    def train_iteration(self) -> dict:
        grpo = self.config.grpo
        plan = self.plan(self.iteration)
        tick = time.time()
        self.policy.module.eval()
        batch, prompt_ids = self.collect(self.iteration, plan)
        local_scores = self.score(batch, prompt_ids)
        rollout_seconds = time.time() - tick
        scores = self.gather_scores(local_scores)
        weights = [reward.weight for reward in self.rewards]
        advantages = group_advantages(scores, grpo.group_size, weights, grpo.advantage_clip)
        local_advantages = advantages[self.local_sample_ids().start:self.local_sample_ids().stop].to(self.device)
        tick = time.time()
        metrics = self.learn(batch, local_advantages)
        learner_seconds = time.time() - tick
        self.iteration += 1
        guidance_factor = 1 if self.config.sample.guidance_scale == 1.0 else 2
        metrics.update(
            reward=float((scores * torch.tensor(weights)).sum(dim=1).mean()),
            advantage_mean=float(advantages.mean()), advantage_std=float(advantages.std(unbiased=False)),
            advantage_abs_max=float(advantages.abs().max()),
            nfe_per_sample=plan.model_evaluations * guidance_factor, window_start=plan.sde_steps[0],
            rollout_s=rollout_seconds, learner_s=learner_seconds,
        )
        for column, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.name}_mean"] = float(scores[:, column].mean())
            metrics[f"reward/{reward.name}_std"] = float(scores[:, column].std(unbiased=False))
        return metrics

    # -- the loop --------------------------------------------------------------------------------------
    def train(self, stop: Optional[GracefulStop] = None) -> dict:
        """Run to train.steps iterations; returns {'step', 'status': finished | already_finished |
        exit_interval | stopped, last metrics}. Stop signals are handled by `stop` when given, else here."""
        with contextlib.ExitStack() as stack:
            if stop is None:
                stop = stack.enter_context(GracefulStop(job="osp-grpo"))
            try:
                return self._train(stop)
            finally:
                if self.reward_client is not None:
                    self.reward_client.close()

    def _train(self, stop: GracefulStop) -> dict:
        cfg, ckpt = self.config.train, self.config.checkpoint
        if self.iteration >= cfg.steps:
            self._say(f"already at train.steps={cfg.steps} (iteration {self.iteration}); nothing to train")
            return {"step": self.iteration, "status": "already_finished"}
        if self.logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self._say(f"policy: {self.policy.trainable_parameters() / 1e6:.3f}M trainable parameters "
                      f"({'LoRA' if self.policy.uses_lora else 'full fine-tuning'}); {len(self.prompts)} prompts; "
                      f"{self.samples_per_iteration} samples per iteration over {self.dp_size} data-parallel "
                      f"ranks; device {self.device}; precision {self.precision}")
        if stop.agreed():
            self._say(f"stopped by {stop.signal_name} before the first iteration; nothing to save")
            return {"step": self.iteration, "status": "stopped"}
        self.logger = logger = MetricsLogger(self.run_dir, cfg.steps, self.iteration, self.logging_rank,
                                             cfg.progress, desc="grpo", log_interval=cfg.log_interval)
        started, first = time.time(), self.iteration
        status, saved_step, last = "finished", None, {}
        evaluate_every = self.config.grpo.eval_interval
        try:
            if evaluate_every and self.iteration == 0:
                initial = self.evaluate()
                logger.log(0, initial)
                logger.message(f"[osp-grpo] evaluation reward before training: {initial['eval_reward']:.4f}")
            while self.iteration < cfg.steps:
                tick = time.time()
                last = self.train_iteration()
                elapsed = time.time() - tick
                last.update(iteration_s=elapsed, samples_per_s=self.samples_per_iteration / elapsed,
                            eta_s=(time.time() - started) / (self.iteration - first) * (cfg.steps - self.iteration))
                if evaluate_every and (self.iteration % evaluate_every == 0 or self.iteration == cfg.steps):
                    last.update(self.evaluate())
                logger.log(self.iteration, last)
                if cfg.sample_interval and self.iteration % cfg.sample_interval == 0 and self.iteration < cfg.steps:
                    self.sample_video()
                if ckpt.interval and self.iteration % ckpt.interval == 0:
                    saved_step = self.save()
                stopping = stop.agreed()
                if stopping or (cfg.exit_interval and self.iteration % cfg.exit_interval == 0
                                and self.iteration < cfg.steps):
                    if saved_step != self.iteration:
                        saved_step = self.save()
                    status = "stopped" if stopping else "exit_interval"
                    reason = f"stopped by {stop.signal_name}" if stopping else "exit interval reached"
                    logger.message(f"[osp-grpo] {reason} at iteration {self.iteration}; checkpoint in "
                                   f"{self.run_dir / 'checkpoints'}; run the same command again to resume")
                    break
            if status == "finished":
                if ckpt.save_at_end and saved_step != self.iteration:
                    self.save()
                if self.policy.uses_lora:
                    path = self.policy.export_merged(self.run_dir, self.iteration)
                    self._say(f"LoRA merged into the weights: {path} (osp-sample --checkpoint "
                              f"{self.run_dir / 'merged'})")
                if cfg.sample_at_end:
                    self.sample_video()
        finally:
            logger.close()
        return {"step": self.iteration, "status": status, **last}

    def save(self) -> int:
        """Checkpoint this iteration; returns the iteration saved."""
        rank_state = {"step": self.iteration, "rng": rng_state()}
        path = self.policy.save(self.run_dir, self.iteration, rank_state, self.config.checkpoint.keep_last or None)
        self.logger.message(f"[osp-grpo] saved checkpoint {path}")
        return self.iteration

    def sample_video(self) -> Path:
        """Render the sample prompt(s) to run.dir/samples/iteration_N.mp4 (the final one to sample.output when
        set) with a PNG frame strip beside each, shown in TensorBoard too."""
        from osp_megatron.inference.runner import render_sample

        output = self.run_dir / "samples" / f"iteration_{self.iteration:06d}.mp4"
        if self.config.sample.output and self.iteration >= self.config.train.steps:
            output = self.config.sample.output
        paths = render_sample(self.policy.module, self.config, self.device, output, write=self.logging_rank)
        paths = paths if isinstance(paths, list) else [paths]
        if self.logging_rank:
            from PIL import Image

            for index, path in enumerate(paths):
                strip = np.asarray(Image.open(path.with_suffix(".png")).convert("RGB"))
                self.logger.log_image(f"samples/{index}", strip, self.iteration)
            self._say(f"sample video written to {', '.join(str(p) for p in paths)} (frame strip beside it)")
        return paths[0]
