"""Console hygiene for the command-line jobs: silence known third-party start-up noise, keep real warnings.

megatron-core warns at import time about optional accelerators that a CPU run never needs.
"""

import warnings

_KNOWN_NOISE = (
    "Transformer Engine and Apex are not installed",
    "full scope is deprecated",
    "MLP requires ffn_hidden_size",
)


def quiet_third_party_warnings() -> None:
    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
