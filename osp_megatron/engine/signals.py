"""Graceful stops: SIGINT, SIGTERM and SIGUSR1 ask a job to finish its current step, checkpoint and exit 0.

All ranks agree on the stop step through one tiny all-reduce per step; a second Ctrl-C exits at once.
"""

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_AT_ONCE_STATUS = 130  # the shell's status for a job ended by Ctrl-C


class GracefulStop:
    """Context manager that turns stop signals into a flag the training loop polls between steps.

    with GracefulStop(job="osp-train") as stop:
        while ...:
            train_step()
            if stop.agreed():   # collective: every rank calls it once per step
                save(); break
    """

    def __init__(self, job: str = "job", signals=STOP_SIGNALS, announce: bool = True):
        self.job = job
        self.signals = tuple(signals)
        self.announce = announce
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        """True once this process received a stop signal."""
        return self.signal_name is not None

    def __enter__(self):
        # Python delivers signals to the main thread only; elsewhere (a notebook worker thread) nothing is installed.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            # The user insists: no checkpoint, no cleanup; an unfinished save stays an ignored '.tmp' folder.
            sys.stderr.write(f"\n[{self.job}] second Ctrl-C: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(EXIT_AT_ONCE_STATUS)
        if not self.requested:
            self.signal_name = name
            if self.announce:
                hint = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
                sys.stderr.write(f"\n[{self.job}] {name} received: finishing the current step, then saving{hint}\n")
                sys.stderr.flush()

    def request(self, name: str = "request") -> None:
        """Ask for a stop from code (tests, time limits) exactly as a signal would."""
        if not self.requested:
            self.signal_name = name

    def agreed(self, device: torch.device | None = None) -> bool:
        """True on every rank when any rank was asked to stop (collective over the default group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not self.requested:
            self.signal_name = "peer"  # another rank got the signal; this one stops at the same step
        return flag.item() > 0
