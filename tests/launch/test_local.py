"""osp-launch --local: two torchrun ranks on this machine; SIGTERM to osp-launch mid-run reaches each rank once,
the job saves and exits 0, and a second launch resumes to the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osp_launch.local import torchrun_command

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def test_torchrun_command():
    assert torchrun_command("osp_megatron.training.cli", ["--config", "x.yaml"], 4)[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "-m",
        "osp_megatron.training.cli",
        "--config",
        "x.yaml",
    ]


def launch(run_dir: Path, data_dir: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "osp_launch.cli",
        "--local",
        "2",
        "osp-train",
        "--config",
        "examples/tiny_t2v.yaml",
        f"run.dir={run_dir}",
        f"data.path={data_dir}",
        "train.eval_interval=0",
        f"train.steps={STEPS}",
        "checkpoint.interval=100",
        "train.sample_at_end=false",
        "train.progress=false",
        "train.device=cpu",
        "train.micro_batch_size=4",
        "data.synthetic_num_samples=64",
        "data.synthetic_samples_per_shard=32",
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def losses(run_dir: Path) -> dict:
    return {row["step"]: row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_sigterm_saves_and_the_next_launch_resumes_exactly(tmp_path):
    """SIGTERM after step 2: every rank finishes the step, the job writes a checkpoint at the stop step and
    exits 0; launching again resumes there and every step's loss equals the uninterrupted run's (1e-6)."""
    data = tmp_path / "data"
    reference = tmp_path / "reference"
    finish(launch(reference, data))

    stopped = tmp_path / "stopped"
    process = launch(stopped, data)
    deadline = time.time() + 240
    while not (stopped / "metrics.jsonl").exists() or len(losses(stopped)) < 2:
        assert process.poll() is None and time.time() < deadline, "the job ended or stalled before step 2"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out = finish(process)
    step = int((stopped / "checkpoints" / "latest").read_text().split("_")[1])
    assert 2 <= step < STEPS, out[-4000:]
    assert "ended after SIGTERM with status 0" in out

    out = finish(launch(stopped, data))
    assert f"resumed from {stopped / 'checkpoints' / f'step_{step:08d}'} at step {step}" in out
    expected, got = losses(reference), losses(stopped)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in expected:
        assert abs(got[s] - expected[s]) <= 1e-6, (s, got[s], expected[s])
