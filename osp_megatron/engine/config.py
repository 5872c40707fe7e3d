"""A job's configuration: one typed tree (run, train, checkpoint, parallel, model, data, quant, sample, lora).

Built from a YAML file plus dotted overrides by `load_job_config`; cross-section consistency is checked here.
"""

from dataclasses import dataclass, field
from typing import Literal

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import load_config
from osp_megatron.data.config import DataConfig
from osp_megatron.engine.sample_config import SampleConfig
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.config import ParallelConfig
from osp_megatron.quantization.config import QuantConfig


@dataclass
class RunConfig:
    dir: str = "runs/tiny_t2v"  # output folder: checkpoints/, tensorboard/, metrics.jsonl, samples/

    def validate(self, prefix: str = "run") -> None:
        if not self.dir:
            raise ConfigError(f"{prefix}.dir must name an output folder")


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    # Save and exit once the step is a multiple of this (Megatron's --exit-interval); 0 disables it.
    exit_interval: int = 0
    micro_batch_size: int = 1
    global_batch_size: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA copy of the weights
    # Where the EMA lives: "auto" beside the parameters (sharded like them under parallel.fsdp), "cpu" in host
    # memory, updated by a background thread while the next step runs.
    ema_device: Literal["auto", "cpu"] = "auto"
    # Rectified flow: s = sigmoid(N(logit_mean, logit_std)), then s' = k s / (1 + (k - 1) s) with k = shift.
    timestep_shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Probability that a sample trains on the text states of sample.negative_prompt instead of its caption, so
    # that the model learns the unconditional branch classifier-free guidance samples with; decided per sample
    # from (seed, sample index). 0 trains on captions only.
    text_dropout: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Intra-op threads of a process that computes on the CPU; 0 keeps torch's choice (one per core, or
    # OMP_NUM_THREADS: 1 under torchrun). Small models gain little from more threads, and threads waiting for a
    # core another program holds slow every operation down, so the tiny example uses 1.
    cpu_threads: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on accelerators, fp32 on CPU
    progress: bool = True  # console progress (rank 0): a bar on a terminal, else a plain line every log_interval steps
    log_interval: int = 10
    sample_at_end: bool = True  # write one sample video with the final (EMA if any) weights
    # Held-out loss every N steps on data.eval_path (fixed noise and timesteps, so the curve is comparable).
    eval_interval: int = 0
    eval_samples: int = 32
    # Render the sample prompt(s) every N steps to run.dir/samples/step_N.mp4 (+ .png strip, TensorBoard).
    sample_interval: int = 0
    # Peak dense bf16 TFLOP/s of one accelerator, for the MFU metric (989: H200 SXM).
    peak_tflops: float = 989.0

    def validate(self, prefix: str = "train") -> None:
        positive = ("steps", "micro_batch_size", "global_batch_size", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("exit_interval", "warmup_steps", "eval_interval", "sample_interval", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_samples < 1:
            raise ConfigError(f"{prefix}.eval_samples must be >= 1, got {self.eval_samples}")
        if self.peak_tflops <= 0:
            raise ConfigError(f"{prefix}.peak_tflops must be > 0, got {self.peak_tflops}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{prefix}.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if not 0 <= self.text_dropout < 1:
            raise ConfigError(f"{prefix}.text_dropout must be in [0, 1), got {self.text_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{prefix}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.timestep_shift <= 0:
            raise ConfigError(f"{prefix}.timestep_shift must be > 0, got {self.timestep_shift}")
        if self.logit_std <= 0:
            raise ConfigError(f"{prefix}.logit_std must be > 0, got {self.logit_std}")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{prefix}.global_batch_size={self.global_batch_size} is not a multiple of "
                f"{prefix}.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end and at exit_interval)
    # "auto": continue from the newest complete checkpoint in run.dir if any; "none": start fresh;
    # or a path to a checkpoint folder to continue from.
    resume: str = "auto"
    # Initialise weights only: a framework checkpoint (e.g. from `osp-ckpt import`), a diffusers transformer
    # folder, or an original Wan2.1 / OSP-Next weight file.
    load: str | None = None
    load_ema: bool = False  # with `load`: take the EMA weights instead of the raw ones
    keep_last: int = 0  # keep only the newest N checkpoints (0 keeps all)
    save_at_end: bool = True
    # Write checkpoints in the background: training continues once the tensors are copied to host memory;
    # the checkpoint is published (renamed, `latest` updated) when every rank has written its files.
    async_save: bool = False

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ConfigError(f"{prefix}.interval and {prefix}.keep_last must be >= 0")
        if not self.resume:
            raise ConfigError(f"{prefix}.resume must be 'auto', 'none' or a checkpoint path")


# OSP-Next trains LoRA on the q, k, v and output projections of self- and cross-attention.
ATTENTION_PROJECTIONS = ["linear_q", "linear_k", "linear_v", "linear_proj"]


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT) on the named linears; the base weights stay frozen."""

    rank: int = 32
    alpha: float = 64.0
    # Module-name suffixes, as PEFT matches them: "linear_q" hits self- and cross-attention,
    # "self_attention.linear_q" only self-attention; "linear_fc1" / "linear_fc2" are the FFN.
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))

    def validate(self, prefix: str = "lora") -> None:
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank must be >= 1 (leave lora null for full fine-tuning)")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ConfigError(f"{prefix}.target_modules must name at least one linear, e.g. {ATTENTION_PROJECTIONS}")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Low-rank adapters on the named linears with the base weights frozen (checkpoint.load gives the base);
    # null trains every weight.
    lora: LoraConfig | None = None

    @classmethod
    def resolve_defaults(cls, data: dict, prefix: str) -> dict:
        """Data fields that must equal model fields default to the model's values (after its preset)."""
        model = data.get("model") or {}
        if isinstance(model, dict) and isinstance(data.get("data", {}), dict):
            resolved = ModelConfig.resolve_defaults(dict(model), "model")
            section = dict(data.get("data") or {})
            for data_key, model_key in (
                ("text_dim", "text_dim"),
                ("text_len", "text_len"),
                ("latent_channels", "in_channels"),
                ("synthetic_vae", "vae"),
            ):
                if data_key not in section:
                    section[data_key] = resolved.get(model_key, getattr(ModelConfig, model_key))
            data["data"] = section
        return data

    def validate(self, prefix: str = "") -> None:
        pairs = [
            ("data.text_dim", self.data.text_dim, "model.text_dim", self.model.text_dim),
            ("data.text_len", self.data.text_len, "model.text_len", self.model.text_len),
            ("data.latent_channels", self.data.latent_channels, "model.in_channels", self.model.in_channels),
            ("data.synthetic_vae", self.data.synthetic_vae, "model.vae", self.model.vae),
        ]
        for key_a, a, key_b, b in pairs:
            if a != b:
                raise ConfigError(
                    f"{key_a}={a} does not match {key_b}={b}; leave {key_a} out (it follows {key_b}) or set both"
                )
        patch = self.model.patch_size
        latent = (self.data.latent_frames, self.data.latent_height, self.data.latent_width)
        for axis, size, step in zip(("latent_frames", "latent_height", "latent_width"), latent, patch):
            if size % step:
                raise ConfigError(f"data.{axis}={size} is not divisible by model.patch_size {patch}")
        # Parallel-layout checks that need the world size (heads per rank, SSP | P^2) run at start-up in
        # osp_megatron.parallel.ssp.check_heads and state.check_layout.


def load_job_config(path=None, overrides=None) -> JobConfig:
    return load_config(JobConfig, path, overrides)
