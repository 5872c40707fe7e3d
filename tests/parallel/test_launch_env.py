"""Launchers: rank, world size and local rank are read from torchrun's or Slurm's environment variables."""

import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.state import _launcher_environment

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                    "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_variables(clean_env):
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK are used as given."""
    clean_env.setenv("RANK", "5"), clean_env.setenv("WORLD_SIZE", "8"), clean_env.setenv("LOCAL_RANK", "1")
    assert _launcher_environment() == (5, 8, 1)


def test_slurm_variables(clean_env):
    """Under srun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give the layout and MASTER_PORT gets a default."""
    for name, value in (("SLURM_PROCID", "9"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "1"),
                        ("MASTER_ADDR", "node001")):
        clean_env.setenv(name, value)
    assert _launcher_environment() == (9, 16, 1)
    import os

    assert os.environ["MASTER_PORT"] == "29500"


def test_slurm_without_master_address_is_refused(clean_env):
    """Several Slurm tasks without MASTER_ADDR stop with a message pointing at launch/slurm.sh."""
    clean_env.setenv("SLURM_PROCID", "0"), clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="launch/slurm.sh"):
        _launcher_environment()


def test_plain_process_is_one_rank(clean_env):
    """Without launcher variables the job is a single rank."""
    assert _launcher_environment() == (0, 1, 0)
