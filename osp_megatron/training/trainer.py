"""osp-train's step: rectified flow on pre-encoded latents with gradient accumulation to the global batch.

The model, optimizer, checkpoints, resume, stops, samples and telemetry come from the engine's job loop
(engine/loop.py); this module owns the data, the loss, the held-out evaluation and the optimizer step.
"""

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from osp_megatron.checkpointing.checkpoint import weights_path
from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.config import JobConfig
from osp_megatron.engine.loop import TrainingJob
from osp_megatron.engine.optim import average_gradients, clip_gradients, lr_at, set_lr
from osp_megatron.inference.runner import render_sample
from osp_megatron.models.flops import training_flops
from osp_megatron.parallel import state
from osp_megatron.parallel.ledger import ledger
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.training.flow_matching import PerSampleNoise, flow_matching_losses

# Loss is also reported per quarter of the noise level s: the curves separate what the model learns at each
# part of the trajectory, which the overall mean hides.
TIMESTEP_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def bucket_names() -> list[str]:
    return [f"loss_t/{low:.2f}-{high:.2f}" for low, high in zip(TIMESTEP_BUCKETS, TIMESTEP_BUCKETS[1:])]


class Trainer(TrainingJob):
    """Build everything from a JobConfig, resume if asked, then `train()` until train.steps or a stop."""

    name = "osp-train"
    render = staticmethod(render_sample)

    def __init__(self, config: JobConfig):
        super().__init__(config)
        micro, global_batch = config.train.micro_batch_size, config.train.global_batch_size
        if global_batch % (micro * self.dp_size):
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size x data-parallel "
                f"size = {micro} x {self.dp_size}"
            )
        self.accumulation = global_batch // (micro * self.dp_size)
        # checkpoint.load: the initial weights (of every parameter, or the frozen base of a LoRA model).
        # (A resume restores every trained weight; a LoRA model's base comes from the checkpoint's reference.)
        initial = config.checkpoint.load
        if initial and self.resume_path is None:
            initial = weights_path(initial)
        self.build_trained_model(initial, "ema" if config.checkpoint.load_ema else "model")
        if self.resume_path is None and config.checkpoint.load:
            self.say(
                f"initialised {'the LoRA base' if config.lora else 'the weights'} from {config.checkpoint.load}"
                f"{' (EMA)' if config.checkpoint.load_ema else ''}"
            )
        self.loader = self._build_loader()
        self.held_out = self._build_held_out()
        # Text states of sample.negative_prompt, which train.text_dropout swaps in.
        self.null_text = self._null_text() if config.train.text_dropout else None
        # Real shards hold one latent shape per bucket: each shape's token grid must suit the parallel layout.
        self.flops_per_sample, self.tokens_per_sample = {}, {}
        for shape in self.loader.latent_shapes:
            grid = tuple(size // patch for size, patch in zip(shape[1:], config.model.patch_size))
            check_sequence_parallel_layout(
                config.model,
                grid,
                config.parallel.tensor,
                config.parallel.ssp,
                config.parallel.ulysses,
                source=f"token grid of data bucket {shape}",
            )
            self.flops_per_sample[tuple(shape)] = training_flops(config.model, grid)
            self.tokens_per_sample[tuple(shape)] = math.prod(grid)
        self.resume()

    # -- set-up ----------------------------------------------------------------------------------------
    def _build_loader(self):
        from osp_megatron.data.loader import build_data_loader
        from osp_megatron.engine.data import ensure_synthetic_data

        if self.config.data.synthetic:
            if dist.get_rank() == 0:
                train = self.config.train
                ensure_synthetic_data(self.config.data, train.eval_samples if train.eval_interval else 0)
            dist.barrier()
        return build_data_loader(
            self.config.data,
            micro_batch_size=self.config.train.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=self.config.train.seed,
            global_batch_size=self.config.train.global_batch_size,
            patch_size=self.config.model.patch_size,
        )

    def _build_held_out(self):
        cfg = self.config
        if not cfg.train.eval_interval:
            return None
        if cfg.data.eval_path is None:
            raise ConfigError(
                "train.eval_interval is set but data.eval_path names no held-out shards; set "
                "data.eval_path to a folder of shards that training does not read"
            )
        from osp_megatron.training.evaluation import HeldOutLoss, load_held_out

        samples = load_held_out(cfg.data, cfg.data.eval_path, cfg.train.eval_samples, self.dp_rank, self.dp_size)
        return HeldOutLoss(
            samples,
            cfg.train.micro_batch_size,
            cfg.train.seed,
            cfg.train,
            self.device,
            group=state.data_parallel_group(),
            dp_size=self.dp_size,
        )

    # -- one optimizer step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        ledger().reset()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = lr_at(self.step, self.config.train)
        set_lr(self.optimizer, lr)
        cfg = self.config.train
        # [loss sum, then (loss sum, count) per timestep bucket, bad data samples], summed over micro-batches
        # and data ranks.
        sums = torch.zeros(2 + 2 * len(bucket_names()), dtype=torch.float64, device=self.device)
        data_wait = 0.0
        for micro_batch in range(self.accumulation):
            tick = time.perf_counter()
            batch = next(self.loader)
            data_wait += time.perf_counter() - tick
            sums[-1] += batch["bad_samples"]
            latents = batch["latents"].to(self.device, non_blocking=True)
            text = batch["text_states"].to(self.device, non_blocking=True)
            indices = self._sample_indices(batch, micro_batch)
            noise = PerSampleNoise(cfg.seed, indices)
            if cfg.text_dropout:
                text = self._drop_text(text, indices)
            with self.autocast():
                losses, sigmas = flow_matching_losses(
                    self.model, latents, text, noise, cfg.timestep_shift, cfg.logit_mean, cfg.logit_std
                )
                loss = losses.mean()
            (loss / self.accumulation).backward()
            sums[0] += loss.detach().double() / self.accumulation
            bucket = torch.bucketize(
                sigmas.detach().double(),
                torch.tensor(TIMESTEP_BUCKETS[1:-1], dtype=torch.float64, device=sigmas.device),
            )
            per_sample = losses.detach().double()
            for index in range(len(TIMESTEP_BUCKETS) - 1):
                chosen = bucket == index
                sums[1 + 2 * index] += per_sample[chosen].sum()
                sums[2 + 2 * index] += chosen.sum()
        if not self.built.fsdp:
            # Mean over data x context ranks: each context rank's gradient is CP x its share
            # (optim.average_gradients); FSDP's reduce-scatter over the same ranks already took that mean.
            average_gradients(
                self.model, state.gradient_reduction_group(), dist.get_world_size(state.gradient_reduction_group())
            )
        grad_norm = clip_gradients(self.model, cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.dp_size > 1:
            dist.all_reduce(sums, group=state.data_parallel_group())
        # A global batch is one data bucket: every micro-batch of the step has this shape and size.
        shape, samples = tuple(batch["latents"].shape[1:]), len(batch["keys"]) * self.accumulation * self.dp_size
        scalars = {
            "loss": float(sums[0]) / self.dp_size,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "data_wait_s": data_wait,
            "data_bad_samples": int(sums[-1]),
            "samples": samples,
            "tokens": samples * self.tokens_per_sample[shape],
            "flops": samples * self.flops_per_sample[shape],
        }
        for index, name in enumerate(bucket_names()):
            count = float(sums[2 + 2 * index])
            if count:
                scalars[name] = float(sums[1 + 2 * index]) / count
        scalars.update(ledger().scalars())
        return scalars

    def _null_text(self) -> torch.Tensor:
        """States [text_len, text_dim] of sample.negative_prompt from the encoder sampling uses."""
        from osp_megatron.inference.runner import job_text_encoder

        return job_text_encoder(self.config).encode([self.config.sample.negative_prompt])[0][0].to(self.device)

    def _drop_text(self, text: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The micro-batch's text states with train.text_dropout of the samples (chosen by (seed, sample index))
        replaced by the states of sample.negative_prompt, which guidance's unconditional branch uses."""
        cfg = self.config
        dropped = [
            np.random.default_rng([cfg.train.seed, int(i), 1]).random() < cfg.train.text_dropout
            for i in indices.tolist()
        ]
        if not any(dropped):
            return text
        mask = torch.tensor(dropped, device=text.device).view(-1, 1, 1)
        return torch.where(mask, self.null_text.to(text.dtype), text)

    def _sample_indices(self, batch: dict, micro_batch: int) -> torch.Tensor:
        """Global sample positions of a micro-batch, which seed its noise and timesteps: the loader's
        `sample_indices`, else the micro-batch's place in this step's global batch."""
        if "sample_indices" in batch:
            return batch["sample_indices"]
        micro = self.config.train.micro_batch_size
        first = self.step * self.config.train.global_batch_size + (micro_batch * self.dp_size + self.dp_rank) * micro
        return torch.arange(first, first + micro)

    # -- what the job loop asks ---------------------------------------------------------------------------
    def evaluation_due(self, step: int) -> bool:
        return bool(self.config.train.eval_interval) and step % self.config.train.eval_interval == 0

    def evaluate(self) -> dict:
        return {"eval_loss": self.held_out(self.model, self.autocast)}

    def extra_rank_state(self) -> dict:
        return {"data": self.loader.state_dict()}

    def load_extra_rank_state(self, rank_state: dict) -> None:
        self.loader.load_state_dict(rank_state["data"])

    def describe(self) -> str:
        return f"accumulation {self.accumulation}"
