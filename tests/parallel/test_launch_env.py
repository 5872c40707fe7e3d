"""Launchers: rank, world size and local rank from torchrun's or Slurm's variables; Slurm host lists; one
rendezvous port per job."""

import os

import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.parallel.rendezvous import (
    RENDEZVOUS_PORT_BASE,
    RENDEZVOUS_PORT_SPAN,
    expand_nodelist,
    launcher_environment,
    rendezvous_port,
)

LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever a test (or launcher_environment) sets is removed again afterwards."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")  # records the original value (or its absence) for the undo
        monkeypatch.delenv(name)
    return monkeypatch


def test_torchrun_variables(clean_env):
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK are used as given."""
    clean_env.setenv("RANK", "5"), clean_env.setenv("WORLD_SIZE", "8"), clean_env.setenv("LOCAL_RANK", "1")
    assert launcher_environment() == (5, 8, 1)


def test_slurm_variables_derive_the_rendezvous(clean_env):
    """Under plain srun the rank comes from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the rendezvous address
    is the allocation's first node and the port is the job's."""
    for name, value in (
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[007-008]"),
        ("SLURM_JOB_ID", "123456"),
    ):
        clean_env.setenv(name, value)
    assert launcher_environment() == (9, 16, 1)
    assert os.environ["MASTER_ADDR"] == "gpu007"
    assert os.environ["MASTER_PORT"] == str(rendezvous_port(123456))


def test_slurm_keeps_an_exported_rendezvous(clean_env):
    """MASTER_ADDR / MASTER_PORT exported by the batch script win over the derived ones."""
    for name, value in (
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_JOB_NODELIST", "a1,a2"),
        ("SLURM_JOB_ID", "7"),
        ("MASTER_ADDR", "login3"),
        ("MASTER_PORT", "31000"),
    ):
        clean_env.setenv(name, value)
    launcher_environment()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("login3", "31000")


def test_slurm_without_any_rendezvous_is_refused(clean_env):
    """Several Slurm tasks with neither MASTER_ADDR nor a node list stop with a message naming osp-launch."""
    clean_env.setenv("SLURM_PROCID", "0"), clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="osp-launch"):
        launcher_environment()


def test_plain_process_is_one_rank(clean_env):
    """Without launcher variables the job is a single rank."""
    assert launcher_environment() == (0, 1, 0)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
        ("gpu[9-11],login2", ["gpu9", "gpu10", "gpu11", "login2"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a[08-10]b,c", ["a08b", "a09b", "a10b", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    """Slurm's compact host lists expand like `scontrol show hostnames`, zero padding kept."""
    assert expand_nodelist(nodelist) == hosts


def test_bad_nodelist_is_named():
    with pytest.raises(ConfigError, match="node\\[a-b\\]"):
        expand_nodelist("node[a-b]")


def test_rendezvous_ports_are_stable_distinct_and_outside_the_ephemeral_range():
    """A job keeps its port across requeues; the next SPAN job ids (jobs that may share a node) all get
    different ports, none in Linux's ephemeral range where the kernel picks outgoing ports."""
    assert rendezvous_port(4242) == rendezvous_port("4242")
    ids = range(987_654, 987_654 + RENDEZVOUS_PORT_SPAN)
    ports = {rendezvous_port(i) for i in ids}
    assert len(ports) == RENDEZVOUS_PORT_SPAN
    assert min(ports) == RENDEZVOUS_PORT_BASE and max(ports) < 32768
