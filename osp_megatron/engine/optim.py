"""Optimizer pieces the trainer owns: AdamW, warm-up + cosine schedule, gradient averaging and clipping, EMA.

Gradient norms count FSDP and tensor-parallel shards once each and replicated parameters once, like Megatron.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from osp_megatron.checkpointing.sharded import partition_dim
from osp_megatron.parallel import state
from osp_megatron.parallel.fsdp import is_fully_sharded, local_tensor
from osp_megatron.parallel.ledger import record_all_reduce, tensor_bytes


def build_optimizer(model: torch.nn.Module, train_config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "norm" in name or "modulation" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) and len(decay + no_decay) > 0
    return torch.optim.AdamW(
        groups,
        lr=train_config.lr,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        eps=train_config.adam_eps,
        fused=fused or None,
    )


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


def average_gradients(
    model: torch.nn.Module,
    group,
    world: int,
    group_name: str = "data_context",
    bucket_bytes: int = GRADIENT_BUCKET_BYTES,
) -> None:
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
    """L2 norm of the whole model's gradient across FSDP and tensor-parallel shards (float32).

    Each rank sums the squares of what it holds: FSDP shards are disjoint pieces of a tensor-parallel slice
    (summed over the data x context ranks), tensor-parallel slices are disjoint (summed over the tensor
    group), and a replicated parameter counts on tensor-parallel rank 0 only.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    device = local_tensor(next(model.parameters())).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    sharded = False
    for param in model.parameters():
        if param.grad is None:
            continue
        sharded = sharded or is_fully_sharded(param.grad)
        if partition_dim(param) is not None or tp_rank == 0:
            total += local_tensor(param.grad).float().pow(2).sum().to(device)
    # With offloaded shards the sum lives in host memory; the collectives run on the job's device.
    total = total.to(state.communication_device())
    if sharded:
        group = state.gradient_reduction_group()
        size = dist.get_world_size(group)
        if size > 1:
            dist.all_reduce(total, group=group)
            record_all_reduce("data_context", tensor_bytes(total), size, "grad_norm", "step")
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
                grad = local_tensor(param.grad)
                grad.mul_(coefficient.to(grad.device, grad.dtype))
    return norm


class EMA:
    """Exponential moving average of this rank's (shard of the) weights, kept in float32.

    device=None keeps each average beside its parameter (so FSDP shards it like the parameters); "cpu" keeps
    it in host memory, where the update runs in a background thread: the parameters are copied into pinned
    staging buffers right after the optimizer step (ordered before the next step's kernels), and the thread
    blends them in while the next step computes. `synchronize()` waits for it; reading the average does too.
    """

    def __init__(self, model: torch.nn.Module, decay: float, device: str | torch.device | None = None):
        self.decay = decay
        self.device = None if device is None else torch.device(device)
        self.shadow = {}
        # The trained weights only: frozen ones (a LoRA model's base) never move.
        for name, param in self._trained(model):
            local = local_tensor(param).detach()
            self.shadow[name] = local.to(self.device or local.device, torch.float32, copy=True)
        self._staging, self._pending, self._worker = None, None, None
        if self.device is not None:
            pin = torch.cuda.is_available()
            self._staging = {name: torch.empty_like(avg, pin_memory=pin) for name, avg in self.shadow.items()}
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")

    def _trained(self, model: torch.nn.Module):
        return [(name, param) for name, param in model.named_parameters() if param.requires_grad or name in self.shadow]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self._staging is None:
            for name, param in self._trained(model):
                self.shadow[name].lerp_(local_tensor(param).detach().float(), 1 - self.decay)
            return
        self.synchronize()  # the staging buffers are free again
        copied = None
        for name, param in self._trained(model):
            self._staging[name].copy_(local_tensor(param).detach(), non_blocking=True)
            if param.is_cuda:
                copied = copied or torch.cuda.Event()
        if copied is not None:
            copied.record()
        self._pending = self._worker.submit(self._blend_staged, copied)

    @torch.no_grad()
    def _blend_staged(self, copied) -> None:
        if copied is not None:
            copied.synchronize()
        for name, average in self.shadow.items():
            average.lerp_(self._staging[name], 1 - self.decay)

    def synchronize(self) -> None:
        """Wait for a background update (a no-op for an average kept beside the parameters)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.synchronize()
        return self.shadow

    @torch.no_grad()
    def restart_from(self, model: torch.nn.Module) -> None:
        """Make the average equal the current weights (after loading weights the average never saw)."""
        self.synchronize()
        for name, param in self._trained(model):
            self.shadow[name].copy_(local_tensor(param).detach())

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        self.synchronize()
        for name, param in self._trained(model):
            local = local_tensor(param)
            local.copy_(self.shadow[name].to(local.device, local.dtype))
