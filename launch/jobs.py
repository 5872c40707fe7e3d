"""The jobs osp-launch can run: each console-script name and the Python module whose main() it is.

A task runs `python -m <module> <arguments>`, so a job needs no launcher-specific code of its own.
"""

import importlib.util

from osp_megatron.config.errors import ConfigError

JOB_MODULES = {
    "osp-train": "osp_megatron.training.cli",
    "osp-grpo": "osp_megatron.rl.cli",
    "osp-sample": "osp_megatron.inference.cli",
    "osp-data": "osp_data.cli",  # osp-launch osp-data encode --config ...
}


def job_module(job: str) -> str:
    """The module that runs `job`, checked to be importable here (the submitting machine shares the install)."""
    if job not in JOB_MODULES:
        raise ConfigError(f"unknown job {job!r}; osp-launch runs {', '.join(JOB_MODULES)}")
    module = JOB_MODULES[job]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(
            f"job {job} runs module {module}, which is not installed here; "
            f"reinstall the checkout that provides it (pip install -e .)"
        )
    return module
