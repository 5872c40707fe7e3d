"""Autograd-aware collectives used by model code at named points (all-reduce, all-to-all).

Each function is differentiable: its backward issues the matching collective on the gradients.
"""

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward; the gradient of a sum that every rank consumes is summed too."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum across `group` where every rank uses the result for a different computation."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)
