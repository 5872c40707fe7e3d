"""Run a job as a child process while noting the stop signals that reach this one, so that the launcher knows,
after the job saved and exited, whether it was stopped early (and should come back) or finished.
"""

import signal
import subprocess
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # those the jobs turn into "save and exit 0"


def run_supervised(
    command: list[str],
    env: dict | None = None,
    forward: Callable[[subprocess.Popen, int], None] | None = None,
    new_session: bool = False,
) -> tuple[int, list[str]]:
    """Run `command` to its end; returns (exit status, names of the stop signals received meanwhile).

    `forward(child, signum)` passes each signal on; without it the child is expected to get the signal itself
    (Slurm signals every process of a job step). The handlers are in place before the child starts, so a signal
    never ends this process in between.
    """
    received: list[str] = []
    child: subprocess.Popen | None = None

    def note(signum, frame):
        received.append(signal.Signals(signum).name)
        if forward is not None and child is not None:
            forward(child, signum)

    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    try:
        child = subprocess.Popen(command, env=env, start_new_session=new_session)
        returncode = child.wait()
    finally:
        if child is not None and child.poll() is None:  # this process is failing: do not leave the job behind
            child.kill()
            child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, received


def stopped_by(received: list[str], returncode: int) -> bool:
    """Whether the job ended because of the stop signals in `received`: it saved and exited 0, or a signal came
    before the job could handle it (start-up) and ended it."""
    numbers = [signal.Signals[name].value for name in received if signal.Signals[name] in STOP_SIGNALS]
    return bool(numbers) and (returncode == 0 or any(returncode in (-number, 128 + number) for number in numbers))
