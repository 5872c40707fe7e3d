"""Optimizer pieces the trainer owns: AdamW, warm-up + cosine schedule, gradient averaging and clipping, EMA.

Gradient norms count tensor-parallel shards once each and replicated parameters once, like Megatron.
"""

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from osp_megatron.checkpointing.sharded import partition_dim
from osp_megatron.parallel.ledger import record_all_reduce, tensor_bytes


def build_optimizer(model: torch.nn.Module, train_config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "norm" in name or "modulation" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) and len(decay + no_decay) > 0
    return torch.optim.AdamW(groups, lr=train_config.lr, betas=(train_config.adam_beta1, train_config.adam_beta2),
                             eps=train_config.adam_eps, fused=fused or None)


def lr_at(step: int, train_config) -> float:
    """Linear warm-up to train.lr, then cosine decay to train.min_lr at train.steps."""
    base, floor, warmup, total = train_config.lr, train_config.min_lr, train_config.warmup_steps, train_config.steps
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# Gradients are all-reduced in flat buckets of at most this many bytes: one collective per bucket, and the
# extra memory is one bucket instead of a second copy of every gradient (57 GB of fp32 for wan-14b).
GRADIENT_BUCKET_BYTES = 256 * 2**20


def gradient_buckets(grads, bucket_bytes: int = GRADIENT_BUCKET_BYTES) -> list:
    """`grads` grouped by dtype, each group cut in order into buckets of at most `bucket_bytes` (a gradient
    larger than that forms a bucket of its own)."""
    by_dtype = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    buckets = []
    for same_dtype in by_dtype.values():
        bucket, size = [], 0
        for grad in same_dtype:
            nbytes = grad.numel() * grad.element_size()
            if bucket and size + nbytes > bucket_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(grad)
            size += nbytes
        buckets.append(bucket)
    return buckets


def average_gradients(model: torch.nn.Module, group, world: int, group_name: str = "data_context",
                      bucket_bytes: int = GRADIENT_BUCKET_BYTES) -> None:
    """Average gradients over `group` (data x context parallel ranks), one flat all-reduce per bucket.

    Why the mean over context ranks too: every context (SSP x Ulysses) rank computes the same loss from the
    output gathered at the layout's exit, whose backward hands each rank CP x its own tokens' output gradient
    (the reduce-scatter of CP identical gradients). A rank's gradient is thus CP x its tokens' share for
    weights used before the exit plus the whole gradient for the replicated output head; summing over the
    CP ranks gives CP x the single-rank gradient, and the mean over data x context ranks is exactly the
    gradient of the global batch.
    """
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for bucket in gradient_buckets(grads, bucket_bytes):
        flat = torch._utils._flatten_dense_tensors(bucket)
        flat.div_(world)
        dist.all_reduce(flat, group=group)
        record_all_reduce(group_name, tensor_bytes(flat), world, "gradients", "step")
        for grad, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            grad.copy_(synced)
        del flat


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """L2 norm of the whole model's gradient across tensor-parallel shards (float32)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param in model.parameters():
        if param.grad is None:
            continue
        if partition_dim(param) is not None or tp_rank == 0:
            total += param.grad.float().pow(2).sum()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        record_all_reduce("tensor", tensor_bytes(total), tp_size, "grad_norm", "step")
    return total.sqrt()


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = global_grad_norm(model)
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(coefficient.to(param.grad.dtype))
    return norm


class EMA:
    """Exponential moving average of the (local shard of the) weights, kept in float32."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name].to(param.dtype))
