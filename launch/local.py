"""`osp-launch --local N`: the same job under torchrun on this machine, N ranks, with stop signals (Ctrl-C,
SIGTERM, SIGUSR1) passed once to every rank so that the job saves and exits 0 as it does on Slurm.
"""

import shlex
import subprocess
import sys

import psutil

from .supervisor import run_supervised


def torchrun_command(module: str, arguments: list[str], ranks: int) -> list[str]:
    # --standalone: a rendezvous on a free local port, so several local jobs never collide.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(ranks),
        "-m",
        module,
        *arguments,
    ]


def _signal_ranks(torchrun: subprocess.Popen, signum: int) -> None:
    """Send `signum` to torchrun's worker processes (the ranks), or to torchrun itself before they exist.

    torchrun answers a signal by re-sending it to the ranks and killing them 30 s later; a rank that already got
    Ctrl-C from the terminal would see it twice (and a second Ctrl-C means "exit without saving"). So torchrun
    runs in its own session, away from the terminal, and only this launcher talks to the ranks.
    """
    try:
        ranks = psutil.Process(torchrun.pid).children()
    except psutil.NoSuchProcess:
        return
    for process in ranks or [psutil.Process(torchrun.pid)]:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def run_local(job: str, module: str, arguments: list[str], ranks: int) -> int:
    """Run the job on `ranks` local processes; returns torchrun's exit status."""
    command = torchrun_command(module, arguments, ranks)
    print(f"[osp-launch] {job} on {ranks} local rank(s): {shlex.join(command)}", flush=True)
    returncode, received = run_supervised(command, forward=_signal_ranks, new_session=True)
    if received:
        print(f"[osp-launch] {job} ended after {', '.join(received)} with status {returncode}", flush=True)
    return returncode if returncode >= 0 else 128 - returncode
