"""Where a rank learns who it is and where to meet the others: torchrun's or Slurm's variables, the first node
of a Slurm allocation, and one rendezvous port per Slurm job so that jobs sharing a node never collide.
"""

import os
import re

from osp_megatron.config.errors import ConfigError

# Rendezvous ports live below Linux's default ephemeral range (32768-60999), so the kernel never hands one to an
# outgoing connection; two jobs on one node collide only if their job ids differ by a multiple of the span.
RENDEZVOUS_PORT_BASE = 20000
RENDEZVOUS_PORT_SPAN = 12768


def rendezvous_port(job_id: int | str) -> int:
    """The MASTER_PORT of Slurm job `job_id`: stable across requeues, distinct for the next 12768 job ids."""
    return RENDEZVOUS_PORT_BASE + int(job_id) % RENDEZVOUS_PORT_SPAN


def _expand_bracket_name(name: str) -> list[str]:
    """'gpu[01-03,7]-ib' -> ['gpu01-ib', 'gpu02-ib', 'gpu03-ib', 'gpu7-ib'] (zero padding kept; nested in order)."""
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    hosts = []
    for part in match.group(1).split(","):
        if "-" in part:
            first, last = part.split("-", 1)
            numbers = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
        else:
            numbers = [part]
        for number in numbers:
            hosts.extend(_expand_bracket_name(head + number + tail))
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list ('node[001-002],gpu7') as host names, in Slurm's order (scontrol show hostnames)."""
    names, depth, current = [], 0, ""
    for char in nodelist.strip():
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    names.append(current)
    try:
        return [host for name in names if name for host in _expand_bracket_name(name)]
    except ValueError:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list") from None


def launcher_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's variables; (0, 1, 0) when neither is set.

    Under plain `srun` (one task per GPU, no osp-launch) the rendezvous address defaults to the allocation's first
    node and the port to `rendezvous_port(SLURM_JOB_ID)`, so every task derives the same pair on its own.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        if world > 1 and "MASTER_ADDR" not in os.environ:
            if "SLURM_JOB_NODELIST" not in os.environ or "SLURM_JOB_ID" not in os.environ:
                raise ConfigError(
                    "running under Slurm with several tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST and "
                    "SLURM_JOB_ID are set; submit the job with osp-launch, or export MASTER_ADDR and MASTER_PORT"
                )
            os.environ["MASTER_ADDR"] = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])[0]
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(rendezvous_port(os.environ.get("SLURM_JOB_ID", 0)))
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0
