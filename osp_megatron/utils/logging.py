"""Console hygiene for the command-line jobs: silence known third-party start-up noise, keep real warnings.

megatron-core warns at import time about optional accelerators that a CPU run never needs.
"""

import sys
import warnings

from tqdm import tqdm

_KNOWN_NOISE = (
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
    "MLP requires ffn_hidden_size",
)


def quiet_third_party_warnings() -> None:
    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def plain_warnings(job: str) -> None:
    """Print each warning as one line, `JOB: warning: MESSAGE`, instead of Python's file, line and source line.

    Categories other than UserWarning keep their name in parentheses; known third-party noise stays silenced.
    The hook is `warnings.showwarning`, which `warnings.catch_warnings` restores on exit.
    """
    quiet_third_party_warnings()

    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        tqdm.write(f"{job}: warning: {message}{kind}", file=file or sys.stderr)  # above any progress bar

    warnings.showwarning = show
