"""The model a job runs, built once for every job: on the meta device, parallelized, materialised where it lives.

Weights that come from a file are read straight into each rank's pieces (its tensor-parallel slice, its FSDP
shard), so no rank ever holds the whole model; a fresh model is initialised from the seed as megatron does.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from osp_megatron.checkpointing.base_weights import BaseWeights, lora_metadata, resolve_base
from osp_megatron.checkpointing.pretrained import load_pretrained_weights
from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.lora import adapter_names, base_weight_names, initialise_adapters, merge_lora
from osp_megatron.engine.parallelize import Parallelized, Role, check_fsdp_role, parallelize_dit
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import torch_dtype
from osp_megatron.models.wan.model import WanDiT
from osp_megatron.parallel.fsdp import TENSOR_PARALLEL_ATTRIBUTES
from osp_megatron.parallel.ledger import watch_tensor_parallel_linears


@dataclass
class JobModel:
    """A built, parallelized DiT and what a job needs to know about it."""

    module: WanDiT
    role: str
    parallelized: Parallelized
    lora: object | None = None  # the LoraConfig of an adapted model
    base: BaseWeights | None = None  # the frozen base of an adapted model

    @property
    def fsdp(self) -> bool:
        return self.parallelized.fsdp

    def stored_parameters(self) -> list[str] | None:
        """The weights a checkpoint of this model stores: the adapters of a LoRA model, else all (None)."""
        return adapter_names(self.module) if self.lora is not None else None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def lora_seed(config) -> int:
    """Adapters are drawn from their own seed: the same adapters whatever else the job draws first."""
    return config.train.seed + 1


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a model built on the meta device (sharded or not) on `device`, uninitialised, keeping the
    tensor-parallel attributes megatron set on its parameters (to_empty makes new parameters)."""
    marks = {
        name: {key: getattr(param, key) for key in TENSOR_PARALLEL_ATTRIBUTES if hasattr(param, key)}
        for name, param in model.named_parameters()
    }
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        for key, value in marks[name].items():
            setattr(param, key, value)
    watch_tensor_parallel_linears(model)


def _dtype(role: Role, config, device: torch.device) -> torch.dtype:
    """Weights' dtype: model.params_dtype while training (FP32 masters), sample.precision for inference."""
    if role == "inference":
        precision = config.sample.precision
        if precision == "bf16" or (precision == "auto" and device.type != "cpu"):
            return torch.bfloat16
        return torch.float32
    return torch_dtype(config.model.params_dtype)


def compute_dtype(config, device: torch.device) -> torch.dtype | None:
    """The dtype FSDP gathers blocks in: bfloat16 under bf16 training, else the stored dtype (None)."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def build_job_model(
    config,
    device: torch.device,
    role: Role = "train",
    *,
    weights: str | Path | None = None,
    which: str = "model",
    adapters: bool = True,
) -> JobModel:
    """The DiT of `config` (a JobConfig) for `role`, parallelized by parallelize_dit, on `device`.

    weights: where its weights come from (a framework checkpoint, diffusers folder or Wan2.1 file), read into
    each rank's pieces; for a LoRA model (config.lora, role "train") these are the frozen base, and the adapters
    start from their own seed. None: a fresh model initialised from the torch seed. adapters=False builds the
    plain model even when config.lora is set. A model a checkpoint will overwrite comes from
    build_resumable_model instead.
    """
    lora = config.lora if role == "train" and adapters else None
    if lora is not None and weights is None:
        raise ConfigError(
            "lora adapts a trained model: set checkpoint.load to its base weights (a checkpoint, "
            "diffusers folder or Wan2.1 file)"
        )
    return _build(config, device, role, weights, which, lora, initialize=weights is None)


def build_resumable_model(config, device: torch.device, base: BaseWeights | None = None) -> JobModel:
    """A training model whose weights a checkpoint will overwrite: allocated, not initialised (for a LoRA model
    its frozen base is read from `base`, and a checkpoint then restores the adapters)."""
    if config.lora is not None:
        if base is None:
            raise ConfigError("resuming a LoRA job needs its base weights")
        return _build(config, torch.device(device), "train", base.path, base.which, config.lora, initialize=False)
    return _build(config, torch.device(device), "train", None, "model", None, initialize=False)


def _build(config, device, role, weights, which, lora, initialize: bool) -> JobModel:
    device = torch.device(device)
    parallel = config.parallel
    on_meta = not initialize
    if on_meta:
        module = build_model(config.model, meta=True)
        module.to(_dtype(role, config, device))
    else:
        # Megatron's CPU initialisation draws each full weight and keeps this rank's slice: the same model under
        # every layout. Under FSDP it stays in host memory until sharding moves each rank's shards.
        module = build_model(config.model, "cpu" if parallel.fsdp else device)
    parallelized = parallelize_dit(
        module,
        role,
        parallel=parallel,
        quant=config.quant,
        lora=lora,
        lora_seed=None if on_meta else lora_seed(config),
        compile=config.model.compile,
        compute_dtype=compute_dtype(config, device) if role != "inference" else None,
        device=device,
    )
    if on_meta:
        materialize(module, device)
        if weights is not None:
            names = base_weight_names(module) if lora is not None else None
            load_pretrained_weights(module, weights, which=which, names=names)
        if lora is not None:
            initialise_adapters(module, lora_seed(config))
    base = None
    if lora is not None:
        from osp_megatron.checkpointing.base_weights import reference_to

        base = reference_to(weights, which)
    return JobModel(module, role, parallelized, lora, base)


def load_for_inference(config, weights: str | Path, which: str, device: torch.device) -> JobModel:
    """The DiT of `config` holding the weights at `weights` for sampling: a LoRA checkpoint's adapters are
    folded into its base; quantization (config.quant) in its inference form."""
    from dataclasses import replace

    info = lora_metadata(weights) if Path(weights).is_dir() and (Path(weights) / "metadata.json").is_file() else None
    if info is None:
        built = _build(config, device, "inference", weights, which, None, initialize=False)
        built.module.eval()
        return built
    from osp_megatron.checkpointing.checkpoint import load_model_weights
    from osp_megatron.engine.config import LoraConfig

    if config.parallel.fsdp:
        check_fsdp_role("inference")
    base = resolve_base(weights)
    lora = LoraConfig(**info["lora"])
    # Quantization is applied to the merged weights: build without it, merge, then quantize.
    plain = replace(config, quant=replace(config.quant, recipe="none", attention=False))
    built = _build(plain, device, "train", base.path, base.which, lora, initialize=False)
    module = built.module
    missing, _ = load_model_weights(
        weights, module, which=which, strict=False, names={name: name for name in adapter_names(module)}
    )
    if missing:
        raise ConfigError(f"LoRA checkpoint {str(weights)!r} lacks adapters {missing[:8]}")
    merge_lora(module)
    module.requires_grad_(False)
    parallelized = parallelize_dit(
        module, "inference", parallel=config.parallel, quant=config.quant, compile=config.model.compile, device=device
    )
    module.to(_dtype("inference", config, device))
    return JobModel(module.eval(), "inference", parallelized, None, None)
