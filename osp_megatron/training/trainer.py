"""The pretraining loop: rectified flow on pre-encoded latents with gradient accumulation to the global batch.

Owns the optimizer step, schedule, clipping, EMA, mixed precision, checkpoint/resume (under any layout),
graceful stops, held-out evaluation, samples during training and telemetry; the model and the process groups
come from megatron-core building blocks, sharding from FSDP2 (parallel.fsdp).
"""

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from osp_megatron.checkpointing.checkpoint import checkpoint_writer, load_checkpoint, resume_target, save_checkpoint
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.job import JobConfig
from osp_megatron.config.loader import to_dict
from osp_megatron.models.builder import build_model, count_parameters
from osp_megatron.models.flops import training_flops
from osp_megatron.parallel import state
from osp_megatron.parallel.ledger import ledger
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.parallel.fsdp import apply_fsdp, local_tensor, reshard
from osp_megatron.training.flow_matching import PerSampleNoise, flow_matching_losses
from osp_megatron.training.metrics import MetricsLogger
from osp_megatron.training.optim import EMA, average_gradients, build_optimizer, clip_gradients, lr_at, set_lr
from osp_megatron.training.signals import GracefulStop

# Loss is also reported per quarter of the noise level s: the curves separate what the model learns at each
# part of the trajectory, which the overall mean hides.
TIMESTEP_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def bucket_names() -> list[str]:
    return [f"loss_t/{low:.2f}-{high:.2f}" for low, high in zip(TIMESTEP_BUCKETS, TIMESTEP_BUCKETS[1:])]


def start_process_groups(config, reserved_ranks: int = 0) -> torch.device:
    """init_distributed for a job's parallel layout over all ranks but the last `reserved_ranks`; gloo when
    train.device=cpu leaves parallel.backend unset. Returns the device init_distributed chose."""
    if config.train.device == "cpu" and config.parallel.backend is None:
        config.parallel.backend = "gloo"
    return state.init_distributed(config.parallel, reserved_ranks=reserved_ranks)


def training_device(config, reserved_ranks: int = 0) -> torch.device:
    """Start the process groups and return the device train.device asks for, with train.cpu_threads applied
    when it is the CPU (0 leaves torch's choice)."""
    device = start_process_groups(config, reserved_ranks)
    if config.train.device == "cpu":
        device = torch.device("cpu")
    elif config.train.device == "cuda" and device.type != "cuda":
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if device.type == "cpu" and config.train.cpu_threads:
        torch.set_num_threads(config.train.cpu_threads)
    return device


class Trainer:
    """Build everything from a JobConfig, resume if asked, then `train()` until train.steps or a stop."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.device = training_device(config)
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
        self.fsdp = config.parallel.fsdp
        # Which checkpoint to continue from is settled before any work, so a refusal costs nothing.
        self.resume_path = self._resume_target()
        self.precision = config.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"

        # Same seed on every rank: megatron's CPU initialisation builds the full weight then keeps this rank's
        # slice, so every tensor-parallel size, with FSDP or without, starts from identical weights. Weights a
        # checkpoint overwrites entirely (resume, checkpoint.load: both refuse missing tensors) are only
        # allocated. Under FSDP the model stays in host memory until sharding moves each rank's shards.
        seed_everything(config.train.seed)
        initialize = self.resume_path is None and not config.checkpoint.load
        self.model = build_model(config.model, "cpu" if self.fsdp else self.device, initialize=initialize)
        # Quantized GEMMs (quant.recipe): the selected linears quantize inputs, weights and output gradients
        # with their recipe; scales agree across the ranks of one model replica.
        self.quantized_layers = []
        if config.quant.recipe != "none":
            from osp_megatron.quantization import apply_quantization

            self.quantized_layers = apply_quantization(self.model, config.quant,
                                                       amax_reduction_group=state.amax_reduction_group())
            if not self.quantized_layers:
                raise ConfigError(f"quant.modules.include={config.quant.modules.include} selects no linear layer")
        if self.resume_path is None and config.checkpoint.load:
            self._load_initial_weights()
        if self.fsdp:
            apply_fsdp(self.model, config.parallel.fsdp_reduce_dtype,
                       torch.bfloat16 if self.precision == "bf16" else None, config.parallel.fsdp_offload,
                       self.device)
        self.optimizer = build_optimizer(self.model, config.train)
        self.ema = None
        if config.train.ema_decay > 0:
            self.ema = EMA(self.model, config.train.ema_decay, "cpu" if config.train.ema_device == "cpu" else None)
        self.writer = checkpoint_writer(self.run_dir, config.checkpoint.keep_last or None,
                                        config.checkpoint.async_save)
        self.loader = self._build_loader()
        self.held_out = self._build_held_out()
        # Text states of sample.negative_prompt, which train.text_dropout swaps in.
        self.null_text = self._null_text() if config.train.text_dropout else None
        self.step = 0
        # Real shards hold one latent shape per bucket: each shape's token grid must suit the parallel layout.
        self.flops_per_sample, self.tokens_per_sample = {}, {}
        for shape in self.loader.latent_shapes:
            grid = tuple(size // patch for size, patch in zip(shape[1:], config.model.patch_size))
            check_sequence_parallel_layout(config.model, grid, config.parallel.tensor, config.parallel.ssp,
                                           config.parallel.ulysses, source=f"token grid of data bucket {shape}")
            self.flops_per_sample[tuple(shape)] = training_flops(config.model, grid)
            self.tokens_per_sample[tuple(shape)] = math.prod(grid)
        self._initialise_weights_or_resume()

    # -- set-up ----------------------------------------------------------------------------------------
    def _build_loader(self):
        from osp_megatron.data.loader import build_data_loader
        from osp_megatron.data.synthetic import ensure_synthetic_data

        if self.config.data.synthetic:
            if dist.get_rank() == 0:
                train = self.config.train
                ensure_synthetic_data(self.config.data, train.eval_samples if train.eval_interval else 0)
            dist.barrier()
        return build_data_loader(self.config.data, micro_batch_size=self.config.train.micro_batch_size,
                                  dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.config.train.seed,
                                  global_batch_size=self.config.train.global_batch_size,
                                  patch_size=self.config.model.patch_size)

    def _build_held_out(self):
        cfg = self.config
        if not cfg.train.eval_interval:
            return None
        if cfg.data.eval_path is None:
            raise ConfigError("train.eval_interval is set but data.eval_path names no held-out shards; set "
                              "data.eval_path to a folder of shards that training does not read")
        from osp_megatron.training.evaluation import HeldOutLoss, load_held_out

        samples = load_held_out(cfg.data, cfg.data.eval_path, cfg.train.eval_samples, self.dp_rank, self.dp_size)
        return HeldOutLoss(samples, cfg.train.micro_batch_size, cfg.train.seed, cfg.train, self.device,
                           group=state.data_parallel_group(), dp_size=self.dp_size)

    def _resume_target(self) -> Optional[Path]:
        return resume_target(self.config.checkpoint.resume, self.run_dir, fsdp=self.fsdp, say=self._say)

    def _load_initial_weights(self) -> None:
        """checkpoint.load: a framework checkpoint (any format or layout), a diffusers folder or an original
        Wan2.1 / OSP-Next weight file; read into the unsharded model, before FSDP and the EMA exist."""
        from osp_megatron.models.pretrained import load_pretrained_weights

        which = "ema" if self.config.checkpoint.load_ema else "model"
        load_pretrained_weights(self.model, self.config.checkpoint.load, which=which)
        self._say(f"initialised {which} weights from {self.config.checkpoint.load}")

    def _initialise_weights_or_resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        _, rank_state = load_checkpoint(path, self.model, self.optimizer, self.ema)
        self.step = int(rank_state["step"])
        self.loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        if self.quantized_layers and "quant" in rank_state:
            from osp_megatron.quantization import load_quantization_state_dict

            load_quantization_state_dict(self.model, rank_state["quant"])
        self._say(f"resumed from {path} at step {self.step}")

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
            with self._autocast():
                losses, sigmas = flow_matching_losses(self.model, latents, text, noise, cfg.timestep_shift,
                                                      cfg.logit_mean, cfg.logit_std)
                loss = losses.mean()
            (loss / self.accumulation).backward()
            sums[0] += loss.detach().double() / self.accumulation
            bucket = torch.bucketize(sigmas.detach().double(), torch.tensor(TIMESTEP_BUCKETS[1:-1], dtype=torch.float64,
                                                                            device=sigmas.device))
            per_sample = losses.detach().double()
            for index in range(len(TIMESTEP_BUCKETS) - 1):
                chosen = bucket == index
                sums[1 + 2 * index] += per_sample[chosen].sum()
                sums[2 + 2 * index] += chosen.sum()
        if not self.fsdp:
            # Mean over data x context ranks: each context rank's gradient is CP x its share
            # (optim.average_gradients); FSDP's reduce-scatter over the same ranks already took that mean.
            average_gradients(self.model, state.gradient_reduction_group(),
                              dist.get_world_size(state.gradient_reduction_group()))
        grad_norm = clip_gradients(self.model, cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.dp_size > 1:
            dist.all_reduce(sums, group=state.data_parallel_group())
        self.step += 1
        # A global batch is one data bucket: every micro-batch of the step has this shape and size.
        shape, samples = tuple(batch["latents"].shape[1:]), len(batch["keys"]) * self.accumulation * self.dp_size
        scalars = {"loss": float(sums[0]) / self.dp_size, "lr": lr, "grad_norm": float(grad_norm),
                   "data_wait_s": data_wait, "data_bad_samples": int(sums[-1]), "samples": samples,
                   "tokens": samples * self.tokens_per_sample[shape],
                   "flops": samples * self.flops_per_sample[shape]}
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
        dropped = [np.random.default_rng([cfg.train.seed, int(i), 1]).random() < cfg.train.text_dropout
                   for i in indices.tolist()]
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
        first = (self.step * self.config.train.global_batch_size
                 + (micro_batch * self.dp_size + self.dp_rank) * micro)
        return torch.arange(first, first + micro)

    def memory_scalars(self) -> dict:
        """Device memory in GiB, maximum over ranks (collective); the peak is reset for the next step."""
        if self.device.type == "cuda":
            values = torch.tensor([torch.cuda.memory_allocated(), torch.cuda.memory_reserved(),
                                   torch.cuda.max_memory_allocated()], dtype=torch.float64, device=self.device)
            torch.cuda.reset_peak_memory_stats()
            names = ("mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib")
        else:
            import psutil

            values = torch.tensor([psutil.Process().memory_info().rss], dtype=torch.float64)
            names = ("mem_rss_gib",)
        if dist.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return {name: float(value) / 2**30 for name, value in zip(names, values)}

    # -- the loop --------------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        saved = {"step": self.step, "data": self.loader.state_dict(), "rng": rng_state()}
        if self.quantized_layers:
            from osp_megatron.quantization import quantization_state_dict

            saved["quant"] = quantization_state_dict(self.model)  # amax histories and scales
        return saved

    def save(self) -> Path:
        """Write a checkpoint of this step (in the background with checkpoint.async_save: published when
        the write ends, which the next save, a stop and the end of training wait for)."""
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer, self.ema, rank_state=self.rank_state(),
            metadata={"model_config": to_dict(self.config.model), "config": to_dict(self.config)},
            writer=self.writer,
        )

    def train(self, stop: Optional[GracefulStop] = None) -> dict:
        """Train to train.steps; returns {'step', 'status': finished | already_finished | exit_interval | stopped}.

        Stop signals are handled by `stop` when given (the CLI installs it before start-up), else here.
        """
        with contextlib.ExitStack() as stack:
            if stop is None:
                stop = stack.enter_context(GracefulStop(job="osp-train"))
            # However training ends, a checkpoint still being written is published before returning.
            stack.callback(self.writer.close)
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict:
        cfg, ckpt = self.config.train, self.config.checkpoint
        final_output = self.final_sample_path()
        if self.step >= cfg.steps:
            self._say(f"already at train.steps={cfg.steps} (checkpoint {self.resume_path}); nothing to train")
            if cfg.sample_at_end and not final_output.exists():
                self.sample_video(final_output)
            return {"step": self.step, "status": "already_finished"}
        if self.logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
            self._say(f"model: {count_parameters(self.model) / 1e6:.2f}M parameters per tensor-parallel rank, blocks "
                      f"{self.model.block_kinds}; world {dist.get_world_size()} (dp {self.dp_size}, tp "
                      f"{state.tensor_parallel_size()}, ssp {state.ssp_size()}, ulysses {state.ulysses_size()}, "
                      f"fsdp {'on' if self.fsdp else 'off'}); "
                      f"accumulation {self.accumulation}; device {self.device}; precision {self.precision}")
        if stop.agreed():
            self._say(f"stopped by {stop.signal_name} before the first step; nothing to save")
            return {"step": self.step, "status": "stopped"}
        self.logger = logger = MetricsLogger(self.run_dir, cfg.steps, self.step, self.logging_rank, cfg.progress,
                                             log_interval=cfg.log_interval)
        started, first_step = time.time(), self.step
        status, last = "finished", {}
        self.saved_step = None
        try:
            while self.step < cfg.steps:
                tick = time.time()
                last = self.train_step()
                elapsed = time.time() - tick
                done = self.step - first_step
                rate = last.pop("samples") / max(elapsed, 1e-9)
                tflops = last.pop("flops") / max(elapsed, 1e-9) / dist.get_world_size() / 1e12
                last.update(samples_per_s=rate, tokens_per_s=last.pop("tokens") / max(elapsed, 1e-9), tflops=tflops,
                            mfu=tflops / cfg.peak_tflops, step_time_s=elapsed,
                            eta_s=(time.time() - started) / done * (cfg.steps - self.step), **self.memory_scalars())
                if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                    last["eval_loss"] = self.held_out(self.model, self._autocast)
                    reshard(self.model)  # forward-only: FSDP's root would keep its gathered parameters
                logger.log(self.step, last)
                if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step < cfg.steps:
                    self.sample_video(self.run_dir / "samples" / f"step_{self.step:08d}.mp4")
                if ckpt.interval and self.step % ckpt.interval == 0:
                    self._save_and_say()
                if stop.agreed():
                    path = self._save_and_say()
                    logger.message(f"[osp-train] stopped by {stop.signal_name} at step {self.step}; checkpoint "
                                   f"{path}; run the same command again to resume")
                    status = "stopped"
                    break
                if cfg.exit_interval and self.step % cfg.exit_interval == 0 and self.step < cfg.steps:
                    self._save_and_say()
                    logger.message(f"[osp-train] exit interval reached at step {self.step}")
                    status = "exit_interval"
                    break
            if status == "finished":
                if ckpt.save_at_end:
                    self._save_and_say()
                if cfg.sample_at_end:
                    self.sample_video(final_output)
        finally:
            logger.close()
        return {"step": self.step, "status": status, **last}

    def _save_and_say(self) -> Path:
        """Save unless this step is saved already; returns the step's checkpoint folder."""
        if self.saved_step != self.step:
            self.saved_path = self.save()
            self.saved_step = self.step
            how = "writing checkpoint (in the background)" if self.writer.asynchronous else "saved checkpoint"
            self.logger.message(f"[osp-train] {how} {self.saved_path}")
        return self.saved_path

    def final_sample_path(self) -> Path:
        """sample.output when set, else run.dir/samples/step_<train.steps>.mp4."""
        if self.config.sample.output:
            return Path(self.config.sample.output)
        return self.run_dir / "samples" / f"step_{self.config.train.steps:08d}.mp4"

    @contextlib.contextmanager
    def _ema_weights(self):
        """Run the body with the EMA weights in the model, then put the training weights back."""
        if self.ema is None:
            yield
            return
        backup = {name: local_tensor(param).detach().to("cpu", copy=True)
                  for name, param in self.model.named_parameters()}
        self.ema.copy_to(self.model)
        try:
            yield
        finally:
            reshard(self.model)  # a sampling forward leaves FSDP's root parameters gathered
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    local_tensor(param).copy_(backup[name])

    def sample_video(self, output: Path) -> Path:
        """Render the sample prompt(s) with the EMA weights (if kept) to `output` plus a PNG frame strip beside
        it, and show the strip in TensorBoard."""
        from osp_megatron.inference.runner import render_sample

        # Under the training precision: FSDP's blocks compute in bf16 under bf16 training.
        with self._ema_weights(), self._autocast():
            paths = render_sample(self.model, self.config, self.device, output, write=self.logging_rank)
        paths = paths if isinstance(paths, list) else [paths]
        if self.logging_rank:
            from PIL import Image

            logger = getattr(self, "logger", None)
            for index, path in enumerate(paths):
                if logger is not None:
                    strip = np.asarray(Image.open(path.with_suffix(".png")).convert("RGB"))
                    logger.log_image(f"samples/{index}", strip, self.step)
            self._say(f"sample video written to {', '.join(str(p) for p in paths)} (frame strip beside it)")
        return paths[0]
