"""Shared setup of the quantization tests: single-threaded torch for their many tiny tensor ops.

On a busy two-core machine intra-op threads spin against other processes and make small ops 50x slower.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread_torch():
    """Run each test with one intra-op thread and restore the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
