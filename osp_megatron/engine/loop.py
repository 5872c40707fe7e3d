"""The job loop osp-train and osp-grpo share: start-up, resume, steps, evaluation, samples, checkpoints, stops.

A job subclasses TrainingJob and supplies its step (and, where it has them, its evaluation and per-rank state);
everything else (what a resume restores, when to save, how a stop or exit_interval ends the run, EMA weights
for samples, LoRA export) behaves the same in every job (docs/engine.md).
"""

import abc
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from osp_megatron.checkpointing.base_weights import lora_checkpoint_metadata, lora_metadata, resolve_base
from osp_megatron.checkpointing.checkpoint import (
    checkpoint_writer,
    load_checkpoint,
    resume_target,
    save_checkpoint,
    weights_path,
)
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import to_dict
from osp_megatron.engine.distributed import training_device
from osp_megatron.engine.kernels import kernel_choice_lines
from osp_megatron.engine.metrics import MetricsLogger
from osp_megatron.engine.model import JobModel, build_job_model, build_resumable_model
from osp_megatron.engine.optim import EMA, build_optimizer
from osp_megatron.engine.rng import rng_state, seed_everything, set_rng_state
from osp_megatron.engine.signals import GracefulStop
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import local_tensor, reshard


class TrainingJob(abc.ABC):
    """A training job on the engine. Subclasses set `name` and `unit` and implement train_step(); they may
    override evaluation_due / evaluate / evaluate_before_training, extra_rank_state / load_extra_rank_state,
    describe(), finish_message() and close()."""

    name = "job"
    unit = "step"  # what one train_step is called in messages ("step", "iteration")
    progress_keys = ("loss", "samples_per_s")
    # render(model, config, device, output, write) -> path(s): how the job draws its sample videos
    # (osp_megatron.inference.runner.render_sample; the sampling pipeline lives above the engine).
    render = None

    def __init__(self, config, reserved_ranks: int = 0):
        self.config = config
        self.device = training_device(config, reserved_ranks=reserved_ranks)
        self.run_dir = Path(config.run.dir)
        self.logging_rank = state.is_logging_rank()
        self.dp_rank, self.dp_size = state.data_parallel_rank(), state.data_parallel_size()
        self.precision = config.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        # Which checkpoint to continue from is settled before any work, so a refusal costs nothing.
        self.resume_path = resume_target(
            config.checkpoint.resume, self.run_dir, fsdp=config.parallel.fsdp, say=self.say
        )
        self.writer = checkpoint_writer(self.run_dir, config.checkpoint.keep_last or None, config.checkpoint.async_save)
        self.step = 0
        self.built: JobModel | None = None  # the model with what the engine applied to it
        self.model: torch.nn.Module | None = None
        self.optimizer = self.ema = None
        self.saved_step, self.saved_path, self.logger = None, None, None

    # -- set-up ----------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.logging_rank:
            print(f"[{self.name}] {text}", flush=True)

    def build_trained_model(self, initial_weights: str | Path | None = None, which: str = "model") -> None:
        """The trained model with its optimizer and EMA: fresh from train.seed, from `initial_weights` (the
        frozen base under LoRA), or allocated for the resume to fill (a LoRA model's base read first)."""
        config = self.config
        seed_everything(config.train.seed)
        if self.resume_path is not None:
            self._check_resume_matches_lora()
            base = None
            if config.lora is not None:
                base = resolve_base(self.resume_path, self._moved_base(initial_weights))
            self.built = build_resumable_model(config, self.device, base)
        else:
            self.built = build_job_model(config, self.device, "train", weights=initial_weights, which=which)
        self.model = module = self.built.module
        self.optimizer = build_optimizer(module, config.train)
        if config.train.ema_decay > 0:
            self.ema = EMA(module, config.train.ema_decay, "cpu" if config.train.ema_device == "cpu" else None)

    def _check_resume_matches_lora(self) -> None:
        """A LoRA checkpoint resumes only as LoRA with its adapters' shape, a full one only without LoRA."""
        saved = (lora_metadata(self.resume_path) or {}).get("lora")
        wanted = self.config.lora
        if saved is None and wanted is not None:
            raise ConfigError(
                f"checkpoint {self.resume_path} trained every weight (no LoRA) but lora is set; resume "
                "it with lora=null, or start a LoRA run elsewhere (run.dir, or checkpoint.resume=none)"
            )
        if saved is not None and (
            wanted is None
            or (saved["rank"], saved["alpha"], list(saved["target_modules"]))
            != (wanted.rank, wanted.alpha, list(wanted.target_modules))
        ):
            raise ConfigError(
                f"checkpoint {self.resume_path} holds LoRA adapters of rank {saved['rank']}, alpha "
                f"{saved['alpha']} on {saved['target_modules']}; resume it with those lora settings"
            )

    def _moved_base(self, configured: str | Path | None) -> Path | None:
        """checkpoint.load when the base a LoRA checkpoint names is not where it was (moved weights)."""
        recorded = Path((lora_metadata(self.resume_path) or {}).get("base_weights", {}).get("path", ""))
        return None if recorded.exists() or configured is None else weights_path(configured)

    def resume(self) -> None:
        """Restore the trained weights, optimizer, EMA, step and per-rank state from resume_path, if any."""
        if self.resume_path is None:
            return
        _, rank_state = load_checkpoint(
            self.resume_path, self.model, self.optimizer, self.ema, parameters=self.built.stored_parameters()
        )
        self.step = int(rank_state["step"])
        set_rng_state(rank_state["rng"])
        if self.built.parallelized.quantized and "quant" in rank_state:
            from osp_megatron.quantization import load_quantization_state_dict

            load_quantization_state_dict(self.model, rank_state["quant"])
        self.load_extra_rank_state(rank_state)
        self.say(f"resumed from {self.resume_path} at {self.unit} {self.step}")

    # -- what a job supplies -----------------------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self) -> dict:
        """One optimizer step (or iteration) on every rank; returns its scalars, with "samples" (and optionally
        "tokens" and "flops") for the throughput."""

    def evaluation_due(self, step: int) -> bool:
        return False

    def evaluate(self) -> dict:
        return {}

    def evaluate_before_training(self) -> dict | None:
        """Scalars to log at step 0 of a fresh run (e.g. the reward before any update), or None."""
        return None

    def extra_rank_state(self) -> dict:
        return {}

    def load_extra_rank_state(self, rank_state: dict) -> None:
        """Restore what extra_rank_state saved (nothing, unless the job saves something)."""
        return None

    def describe(self) -> str:
        """The start-up line after the model line: data, batch, layout specifics of the job."""
        return ""

    def finish_message(self, result: dict) -> str | None:
        return None

    def close(self) -> None:
        """Release what the job holds beyond the model (e.g. its reward ranks) when its loop ends."""
        return None

    def autocast(self):
        if self.precision == "bf16":
            # No weight cache: it would hold a bf16 copy of every weight until the forward ends (2 bytes per
            # parameter) although each weight is used once per forward.
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    # -- checkpoints -------------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        saved = {"step": self.step, "rng": rng_state(), **self.extra_rank_state()}
        if self.built.parallelized.quantized:
            from osp_megatron.quantization import quantization_state_dict

            saved["quant"] = quantization_state_dict(self.model)  # amax histories and scales
        return saved

    def checkpoint_metadata(self) -> dict:
        metadata = {"model_config": to_dict(self.config.model), "config": to_dict(self.config), "job": self.name}
        if self.built.lora is not None:
            metadata.update(lora_checkpoint_metadata(self.built.lora, self.built.base))
        return metadata

    def save(self) -> Path:
        """Checkpoint this step unless it is saved already (in the background with checkpoint.async_save:
        published when the write ends, which the next save, a stop and the end of the run wait for)."""
        if self.saved_step != self.step:
            self.saved_path = save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                self.ema,
                rank_state=self.rank_state(),
                metadata=self.checkpoint_metadata(),
                writer=self.writer,
                parameters=self.built.stored_parameters(),
            )
            self.saved_step = self.step
            how = "writing checkpoint (in the background)" if self.writer.asynchronous else "saved checkpoint"
            self.message(f"{how} {self.saved_path}")
        return self.saved_path

    def export_merged(self) -> Path | None:
        """A LoRA job's final adapters folded into its base, as a plain checkpoint under run.dir/merged (what
        osp-sample and checkpoint.load read); written by rank 0 from the final checkpoint."""
        if self.built.lora is None or self.saved_path is None:
            return None
        self.writer.wait()
        output = self.run_dir / "merged"
        if self.logging_rank:
            from osp_megatron.checkpointing.lora_merge import merge_lora_checkpoint

            merge_lora_checkpoint(self.saved_path, output, overwrite=True)
        if dist.is_initialized():
            dist.barrier()
        self.say(f"LoRA merged into the weights: {output} (osp-sample --checkpoint {output})")
        return output

    # -- samples -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Run the body with the EMA weights in the model, then put the trained weights back."""
        if self.ema is None:
            yield
            return
        module = self.model
        backup = {
            name: local_tensor(param).detach().to("cpu", copy=True)
            for name, param in module.named_parameters()
            if name in self.ema.shadow
        }
        self.ema.copy_to(module)
        try:
            yield
        finally:
            reshard(module)  # a sampling forward leaves FSDP's root parameters gathered
            with torch.no_grad():
                for name, param in module.named_parameters():
                    if name in backup:
                        local_tensor(param).copy_(backup[name])

    def sample_path(self, step: int) -> Path:
        return self.run_dir / "samples" / f"step_{step:08d}.mp4"

    def final_sample_path(self) -> Path:
        """sample.output when set, else run.dir/samples/step_<train.steps>.mp4."""
        if self.config.sample.output:
            return Path(self.config.sample.output)
        return self.sample_path(self.config.train.steps)

    def sample_video(self, output: Path) -> Path:
        """Render the sample prompt(s) with the EMA weights (if kept) to `output` plus a PNG frame strip beside
        it, and show the strip in TensorBoard."""
        module = self.model
        with self.ema_weights(), self.autocast():
            paths = type(self).render(module, self.config, self.device, output, write=self.logging_rank)
        reshard(module)
        module.train()
        paths = paths if isinstance(paths, list) else [paths]
        if self.logging_rank:
            from PIL import Image

            for index, path in enumerate(paths):
                if self.logger is not None:
                    strip = np.asarray(Image.open(path.with_suffix(".png")).convert("RGB"))
                    self.logger.log_image(f"samples/{index}", strip, self.step)
            self.say(f"sample video written to {', '.join(str(p) for p in paths)} (frame strip beside it)")
        return paths[0]

    # -- telemetry -----------------------------------------------------------------------------------------
    def message(self, text: str) -> None:
        if self.logger is not None:
            self.logger.message(f"[{self.name}] {text}")
        else:
            self.say(text)

    def report_kernel_choices(self) -> None:
        """One line per kernel choice measured on the device since the last report (FP8 or bf16 per GEMM shape
        under ``quant.select: measured``, the attention kernel per shape); new shapes report when they appear."""
        for line in kernel_choice_lines():
            self.message(f"kernel choice: {line}")

    def memory_scalars(self) -> dict:
        """Device memory in GiB, maximum over ranks (collective); the peak is reset for the next step."""
        if self.device.type == "cuda":
            values = torch.tensor(
                [torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated()],
                dtype=torch.float64,
                device=self.device,
            )
            torch.cuda.reset_peak_memory_stats()
            names = ("mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib")
        else:
            import psutil

            values = torch.tensor([psutil.Process().memory_info().rss], dtype=torch.float64)
            names = ("mem_rss_gib",)
        if dist.get_world_size() > 1:
            values = values.to(state.communication_device())
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return {name: float(value) / 2**30 for name, value in zip(names, values)}

    def _start_up_line(self) -> str:
        module = self.model
        total = sum(p.numel() for p in module.parameters())
        trained = self.built.trainable_parameters()
        what = (
            f"LoRA rank {self.built.lora.rank} on {len(self.built.parallelized.adapted)} linears, "
            f"{trained / 1e6:.3f}M trainable"
            if self.built.lora is not None
            else "full training"
        )
        sharding = (
            f"on: weights, gradients, optimizer state and EMA sharded over {self._fsdp_ranks()} ranks"
            if self.built.fsdp
            else "off"
        )
        layout = (
            f"world {dist.get_world_size()} (dp {self.dp_size}, tp {state.tensor_parallel_size()}, "
            f"ssp {state.ssp_size()}, ulysses {state.ulysses_size()}, fsdp {sharding})"
        )
        quant = (
            f"; quant {self.config.quant.recipe} on {len(self.built.parallelized.quantized)} layers"
            if self.built.parallelized.quantized
            else ""
        )
        extra = self.describe()
        return (
            f"model: {total / 1e6:.2f}M parameters per tensor-parallel rank, blocks {module.block_kinds}; {what}; "
            f"{layout}; device {self.device}; precision {self.precision}{quant}" + (f"; {extra}" if extra else "")
        )

    @staticmethod
    def _fsdp_ranks() -> int:
        return dist.get_world_size(state.gradient_reduction_group())

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self, stop: GracefulStop | None = None) -> dict:
        """Run to train.steps; returns {'step', 'status': finished | already_finished | exit_interval | stopped,
        the last step's scalars}. Stop signals are handled by `stop` when given (the CLI installs it before
        start-up), else here."""
        with contextlib.ExitStack() as stack:
            if stop is None:
                stop = stack.enter_context(GracefulStop(job=self.name))
            stack.callback(self.close)
            # However training ends, a checkpoint still being written is published before returning.
            stack.callback(self.writer.close)
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict:
        cfg, ckpt = self.config.train, self.config.checkpoint
        if self.step >= cfg.steps:
            self.say(f"already at train.steps={cfg.steps} (checkpoint {self.resume_path}); nothing to train")
            if cfg.sample_at_end and not self.final_sample_path().exists():
                self.sample_video(self.final_sample_path())
            return {"step": self.step, "status": "already_finished"}
        if self.logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        self.say(self._start_up_line())
        if stop.agreed():
            self.say(f"stopped by {stop.signal_name} before the first {self.unit}; nothing to save")
            return {"step": self.step, "status": "stopped"}
        self.logger = logger = MetricsLogger(
            self.run_dir,
            cfg.steps,
            self.step,
            self.logging_rank,
            cfg.progress,
            desc=self.name.removeprefix("osp-"),
            progress_keys=self.progress_keys,
            log_interval=cfg.log_interval,
        )
        started, first_step = time.time(), self.step
        status, last = "finished", {}
        try:
            if self.step == 0:
                before = self.evaluate_before_training()
                if before is not None:
                    logger.log(0, before)
                    last.update(before)
            while self.step < cfg.steps:
                tick = time.time()
                scalars = self.train_step()
                self.step += 1
                self.report_kernel_choices()
                elapsed = max(time.time() - tick, 1e-9)
                scalars.update(self._throughput(scalars, elapsed))
                scalars.update(
                    step_time_s=elapsed,
                    eta_s=(time.time() - started) / (self.step - first_step) * (cfg.steps - self.step),
                    **self.memory_scalars(),
                )
                if self.evaluation_due(self.step):
                    scalars.update(self.evaluate())
                    reshard(self.model)  # forward-only: FSDP's root would keep its gathered parameters
                logger.log(self.step, scalars)
                last = scalars
                if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step < cfg.steps:
                    self.sample_video(self.sample_path(self.step))
                if ckpt.interval and self.step % ckpt.interval == 0:
                    self.save()
                if stop.agreed():
                    path = self.save()
                    self.message(
                        f"stopped by {stop.signal_name} at {self.unit} {self.step}; checkpoint {path}; "
                        "run the same command again to resume"
                    )
                    status = "stopped"
                    break
                if cfg.exit_interval and self.step % cfg.exit_interval == 0 and self.step < cfg.steps:
                    path = self.save()
                    self.message(
                        f"exit interval reached at {self.unit} {self.step}; checkpoint {path}; run the "
                        "same command again to continue"
                    )
                    status = "exit_interval"
                    break
            if status == "finished":
                if ckpt.save_at_end:
                    self.save()
                self.export_merged()
                if cfg.sample_at_end:
                    self.sample_video(self.final_sample_path())
        finally:
            logger.close()
        result = {"step": self.step, "status": status, **last}
        if status == "finished":
            text = self.finish_message(result)
            if text:
                self.say(text)
        return result

    def _throughput(self, scalars: dict, elapsed: float) -> dict:
        samples = scalars.pop("samples")
        out = {"samples_per_s": samples / elapsed}
        if "tokens" in scalars:
            out["tokens_per_s"] = scalars.pop("tokens") / elapsed
        if "flops" in scalars:
            tflops = scalars.pop("flops") / elapsed / dist.get_world_size() / 1e12
            out.update(tflops=tflops, mfu=tflops / self.config.train.peak_tflops)
        return out
