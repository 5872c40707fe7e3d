"""The pretraining loop: rectified flow on pre-encoded latents with gradient accumulation to the global batch.

Owns the optimizer step, schedule, clipping, EMA, mixed precision, checkpoint/resume and telemetry; the
model and the process groups come from megatron-core building blocks.
"""

import contextlib
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from osp_megatron.checkpointing.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.job import JobConfig
from osp_megatron.config.loader import to_dict
from osp_megatron.models.builder import build_model, count_parameters
from osp_megatron.models.flops import training_flops
from osp_megatron.parallel import state
from osp_megatron.parallel.ledger import ledger
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.training.flow_matching import flow_matching_loss
from osp_megatron.training.metrics import MetricsLogger
from osp_megatron.training.optim import EMA, average_gradients, build_optimizer, clip_gradients, lr_at, set_lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


class Trainer:
    """Build everything from a JobConfig, resume if asked, then `train()` until train.steps or exit."""

    def __init__(self, config: JobConfig):
        self.config = config
        if config.train.device == "cpu" and config.parallel.backend is None:
            config.parallel.backend = "gloo"
        grid = tuple(size // patch for size, patch in zip(
            (config.data.latent_frames, config.data.latent_height, config.data.latent_width), config.model.patch_size))
        check_sequence_parallel_layout(config.model, grid, config.parallel.tensor, config.parallel.ssp,
                                       config.parallel.ulysses, source="token grid of data.latent_*")
        self.device = state.init_distributed(config.parallel)
        if config.train.device == "cpu":
            self.device = torch.device("cpu")
        elif config.train.device == "cuda" and self.device.type != "cuda":
            raise ConfigError("train.device=cuda but no CUDA device is available")
        self.run_dir = Path(config.run.dir)
        self.dp_rank, self.dp_size = state.data_parallel_rank(), state.data_parallel_size()
        self.logging_rank = state.is_logging_rank()
        micro, global_batch = config.train.micro_batch_size, config.train.global_batch_size
        if global_batch % (micro * self.dp_size):
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size x data-parallel "
                f"size = {micro} x {self.dp_size}"
            )
        self.accumulation = global_batch // (micro * self.dp_size)

        # Same seed on every rank: megatron's CPU initialisation builds the full weight then keeps this rank's
        # slice, so every tensor-parallel size starts from identical weights.
        seed_everything(config.train.seed)
        self.model = build_model(config.model, self.device)
        # Quantized GEMMs (quant.recipe): the selected linears quantize inputs, weights and output gradients
        # with their recipe; scales agree across the ranks of one model replica.
        self.quantized_layers = []
        if config.quant.recipe != "none":
            from osp_megatron.quantization import apply_quantization

            self.quantized_layers = apply_quantization(self.model, config.quant,
                                                       amax_reduction_group=state.amax_reduction_group())
            if not self.quantized_layers:
                raise ConfigError(f"quant.modules.include={config.quant.modules.include} selects no linear layer")
        self.optimizer = build_optimizer(self.model, config.train)
        self.ema = EMA(self.model, config.train.ema_decay) if config.train.ema_decay > 0 else None
        # Noise and timesteps: one stream per data-parallel replica, shared by its tensor/context ranks.
        self.generator = torch.Generator().manual_seed(config.train.seed * 1000 + self.dp_rank + 1)
        self.loader = self._build_loader()
        self.step = 0
        self.precision = config.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.flops_per_sample = training_flops(config.model, grid)
        self._initialise_weights_or_resume()

    # -- set-up ----------------------------------------------------------------------------------------
    def _build_loader(self):
        from osp_megatron.data.loader import build_data_loader
        from osp_megatron.data.synthetic import ensure_synthetic_data

        if self.config.data.synthetic:
            if dist.get_rank() == 0:
                ensure_synthetic_data(self.config.data)
            dist.barrier()
        return build_data_loader(self.config.data, micro_batch_size=self.config.train.micro_batch_size,
                                  dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.config.train.seed)

    def _initialise_weights_or_resume(self) -> None:
        resume = self.config.checkpoint.resume
        path: Optional[Path] = None
        if resume == "auto":
            path = latest_checkpoint(self.run_dir)
        elif resume != "none":
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
        if path is not None:
            _, rank_state = load_checkpoint(path, self.model, self.optimizer, self.ema)
            self.step = int(rank_state["step"])
            self.generator.set_state(rank_state["generator"])
            self.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
            if self.quantized_layers and "quant" in rank_state:
                from osp_megatron.quantization import load_quantization_state_dict

                load_quantization_state_dict(self.model, rank_state["quant"])
            self._say(f"resumed from {path} at step {self.step}")
        elif self.config.checkpoint.load:
            from osp_megatron.models.pretrained import load_pretrained_weights

            # A framework checkpoint, a diffusers folder or an original Wan2.1 / OSP-Next weight file.
            which = "ema" if self.config.checkpoint.load_ema else "model"
            load_pretrained_weights(self.model, self.config.checkpoint.load, which=which)
            if self.ema is not None:
                self.ema = EMA(self.model, self.config.train.ema_decay)
            self._say(f"initialised {which} weights from {self.config.checkpoint.load}")

    def _say(self, text: str) -> None:
        if self.logging_rank:
            print(f"[osp-train] {text}", flush=True)

    # -- one optimizer step ----------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16":
            # No weight cache: it would hold a bf16 copy of every weight until the forward ends (2 bytes per
            # parameter) although each weight is used once per forward; without checkpointing the casts are
            # kept for the backward either way, with it they are made again in the recomputation.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        ledger().reset()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = lr_at(self.step, self.config.train)
        set_lr(self.optimizer, lr)
        total_loss = torch.zeros((), device=self.device)
        cfg = self.config.train
        for _ in range(self.accumulation):
            batch = next(self.loader)
            latents = batch["latents"].to(self.device, non_blocking=True)
            text = batch["text_states"].to(self.device, non_blocking=True)
            with self._autocast():
                loss = flow_matching_loss(self.model, latents, text, self.generator, cfg.timestep_shift,
                                          cfg.logit_mean, cfg.logit_std)
            (loss / self.accumulation).backward()
            total_loss += loss.detach() / self.accumulation
        # Mean over data x context ranks: each context rank's gradient is CP x its share (optim.average_gradients).
        average_gradients(self.model, state.gradient_reduction_group(),
                          dist.get_world_size(state.gradient_reduction_group()))
        grad_norm = clip_gradients(self.model, cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.dp_size > 1:
            dist.all_reduce(total_loss, group=state.data_parallel_group())
            total_loss /= self.dp_size
        self.step += 1
        return {"loss": float(total_loss), "lr": lr, "grad_norm": float(grad_norm), **ledger().scalars()}

    # -- the loop --------------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        saved = {"step": self.step, "generator": self.generator.get_state(), "data": self.loader.state_dict(),
                 "rng": rng_state()}
        if self.quantized_layers:
            from osp_megatron.quantization import quantization_state_dict

            saved["quant"] = quantization_state_dict(self.model)  # amax histories and scales
        return saved

    def save(self) -> Path:
        path = save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, self.ema, rank_state=self.rank_state(),
            metadata={"model_config": to_dict(self.config.model), "config": to_dict(self.config)},
            keep_last=self.config.checkpoint.keep_last or None,
        )
        self._say(f"saved checkpoint {path}")
        return path

    def train(self) -> dict:
        cfg, ckpt = self.config.train, self.config.checkpoint
        if self.logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self._say(f"model: {count_parameters(self.model) / 1e6:.2f}M parameters on this rank, blocks "
                      f"{self.model.block_kinds}; world {dist.get_world_size()} (dp {self.dp_size}, tp "
                      f"{state.tensor_parallel_size()}, ssp {state.ssp_size()}, ulysses {state.ulysses_size()}); "
                      f"accumulation {self.accumulation}; device {self.device}; precision {self.precision}")
        logger = MetricsLogger(self.run_dir, cfg.steps, self.step, self.logging_rank, cfg.progress)
        samples_per_step = cfg.global_batch_size
        started, first_step = time.time(), self.step
        exited_early = False
        last = {}
        try:
            while self.step < cfg.steps:
                tick = time.time()
                last = self.train_step()
                elapsed = time.time() - tick
                done = self.step - first_step
                rate = samples_per_step / max(elapsed, 1e-9)
                last.update(
                    samples_per_s=rate,
                    tflops=self.flops_per_sample * rate / dist.get_world_size() / 1e12,
                    step_time_s=elapsed,
                    eta_s=(time.time() - started) / done * (cfg.steps - self.step),
                )
                logger.log(self.step, last)
                if ckpt.interval and self.step % ckpt.interval == 0:
                    self.save()
                if cfg.exit_interval and self.step % cfg.exit_interval == 0 and self.step < cfg.steps:
                    if not (ckpt.interval and self.step % ckpt.interval == 0):
                        self.save()
                    logger.message(f"exit interval reached at step {self.step}")
                    exited_early = True
                    break
        finally:
            logger.close()
        if not exited_early and ckpt.save_at_end and not (ckpt.interval and self.step % ckpt.interval == 0):
            self.save()
        if not exited_early and cfg.sample_at_end:
            self.sample_video()
        return {"step": self.step, "exited_early": exited_early, **last}

    def sample_video(self) -> Optional[Path]:
        """Render one video from the final (EMA if kept) weights with the configured sample settings."""
        from osp_megatron.inference.runner import render_sample

        if self.ema is not None:
            self.ema.copy_to(self.model)
        out = render_sample(self.model, self.config, self.device, self.run_dir / "samples" / f"step_{self.step:08d}.mp4",
                            write=self.logging_rank)
        self._say(f"sample video written to {out}")
        return out
