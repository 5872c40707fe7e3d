"""Data-parallel gradient averaging in bounded buckets: the grouping, and the averaged values on gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from osp_megatron.engine.optim import average_gradients, gradient_buckets
from osp_megatron.engine.ranks import run_on_ranks


def test_buckets_keep_dtype_and_order_and_respect_the_size():
    grads = [
        torch.zeros(10),
        torch.zeros(20, dtype=torch.bfloat16),
        torch.zeros(30),
        torch.zeros(5),
        torch.zeros(100),
        torch.zeros(2),
    ]
    buckets = gradient_buckets(grads, bucket_bytes=160)  # 40 float32 values
    assert [[g.numel() for g in bucket] for bucket in buckets] == [[10, 30], [5], [100], [2], [20]]
    assert all(len({g.dtype for g in bucket}) == 1 for bucket in buckets)
    assert sum(len(bucket) for bucket in buckets) == len(grads)
    assert len(gradient_buckets(grads)) == 2  # default size: one bucket per dtype here


def _average(rank, world_size, bucket_bytes):
    dist.init_process_group("gloo")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    for index, param in enumerate(model.parameters()):
        param.grad = torch.full_like(param, float(rank + 1) * (index + 1))
    average_gradients(model, dist.group.WORLD, world_size, bucket_bytes=bucket_bytes)
    return [param.grad.clone() for param in model.parameters()]


@pytest.mark.slow
def test_small_buckets_average_exactly_like_one_bucket():
    """With buckets smaller than one weight (one all-reduce per tensor) every rank holds the mean."""
    for bucket_bytes in (16, 2**30):
        ranks = run_on_ranks(_average, 2, bucket_bytes)
        for grads in ranks:
            for index, grad in enumerate(grads):
                torch.testing.assert_close(grad, torch.full_like(grad, 1.5 * (index + 1)))
