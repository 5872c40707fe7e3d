"""A job's process groups and device: megatron-core's layout over the launcher's ranks, gloo on the CPU.

Every job starts here: osp-train, osp-grpo (its reward ranks apart), osp-sample and osp-eval.
"""

import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel import state


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
