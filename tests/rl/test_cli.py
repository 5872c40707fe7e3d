"""`osp-grpo --help` lists sections and examples; --print-config resolves; a bad key is one clear line."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # osp-grpo runs in subprocesses


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "osp_megatron.rl.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_print_config_and_errors():
    help_text = _run("--help").stdout
    for needle in ("grpo ", "window_mode", "rewards", "lora", "examples:", "torchrun", "metrics.jsonl"):
        assert needle in help_text
    printed = _run("--print-config", "grpo.flash=true")
    assert printed.returncode == 0 and "flash: true" in printed.stdout and "group_size: 4" in printed.stdout
    bad = _run("grpo.window_mode=random")
    assert bad.returncode == 2 and "grpo.window_mode" in bad.stderr and "Traceback" not in bad.stderr
