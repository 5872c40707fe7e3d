"""The README's main job, run once per test session and shared by the end-to-end tests that judge it."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_t2v.yaml"


@dataclass
class MainJob:
    run_dir: Path
    data_dir: Path
    seconds: float
    stdout: str


def run_module(args, cwd, timeout=900):
    """`python -m ARGS` in `cwd`; fails the test with the output's tail unless it exits with 0."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def run_python_module():
    """run_module, for tests that call console entry points."""
    return run_module


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """osp-train on examples/tiny_t2v.yaml exactly as the README runs it, with its folders under a temporary one."""
    root = tmp_path_factory.mktemp("main_job")
    started = time.perf_counter()
    result = run_module(
        [
            "osp_megatron.training.cli",
            "--config",
            str(EXAMPLE),
            f"run.dir={root / 'run'}",
            f"data.path={root / 'data'}",
            f"data.eval_path={root / 'eval'}",
            "train.progress=false",
        ],
        cwd=root,
    )
    return MainJob(root / "run", root / "data", time.perf_counter() - started, result.stdout)
