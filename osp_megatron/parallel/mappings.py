"""Autograd-aware collectives used by model code at named points (all-reduce, all-to-all).

Each function is differentiable: its backward issues the matching collective on the gradients.
"""

import torch
import torch.distributed as dist

from osp_megatron.parallel.ledger import forward_phase, record_all_reduce, tensor_bytes


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward; the gradient of a sum that every rank consumes is summed too."""

    @staticmethod
    def forward(ctx, tensor, group, group_name):
        ctx.group, ctx.group_name = group, group_name
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        record_all_reduce(group_name, tensor_bytes(tensor), dist.get_world_size(group), "sum", forward_phase())
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        record_all_reduce(ctx.group_name, tensor_bytes(grad), dist.get_world_size(ctx.group), "sum", "backward")
        return grad, None, None


def all_reduce_sum_with_grad(tensor: torch.Tensor, group, group_name: str = "tensor") -> torch.Tensor:
    """Differentiable sum across `group` where every rank uses the result for a different computation."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group, group_name)
