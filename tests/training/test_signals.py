"""Stop signals become a flag the loop polls; a second Ctrl-C exits at once with status 130."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from osp_megatron.engine.signals import GracefulStop


def test_signals_set_the_flag_and_handlers_are_restored():
    """SIGTERM and SIGUSR1 only record the request; leaving the context restores the old handlers."""
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(announce=False) as stop:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGUSR1"  # the first reason is kept
        assert stop.agreed()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    """The first SIGINT asks for a stop; the second ends the process with 130 and a one-line message."""
    script = textwrap.dedent("""
        import os, signal, time
        from osp_megatron.engine.signals import GracefulStop
        with GracefulStop(job="t") as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert "not reached" not in result.stdout
    assert "second Ctrl-C" in result.stderr
