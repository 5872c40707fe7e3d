"""osp-train with FSDP and distributed checkpoints: the sharded run logs the single-rank losses, its checkpoint
resumes under another layout, and a kill during an asynchronous save resumes from the previous checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.training.metrics import read_metrics
from osp_megatron.utils.testing import assert_same_training_state, run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_t2v.yaml")
STEPS = 4


def _common(root: Path) -> list[str]:
    return [f"train.steps={STEPS}", "train.sample_at_end=false", "train.progress=false", "train.device=cpu",
            "model.num_layers=3", "model.sparse_ratio=2", "model.full_blocks=1", f"data.path={root / 'data'}",
            "data.synthetic_num_samples=32", "data.synthetic_samples_per_shard=16", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.ema_decay=0.9", "checkpoint.interval=2", "train.lr=1e-3",
            "train.warmup_steps=0", "train.adam_eps=1e-6"]


def _train(rank, world_size, overrides):
    from osp_megatron.config.job import load_job_config
    from osp_megatron.training.trainer import Trainer

    return Trainer(load_job_config(EXAMPLE, overrides)).train()


def _rows(run_dir: Path) -> dict:
    return {row["step"]: row for row in read_metrics(run_dir / "metrics.jsonl")}


def _assert_same_steps(run_dir, reference_dir, steps):
    rows, expected = _rows(run_dir), _rows(reference_dir)
    assert sorted(rows) == list(steps), sorted(rows)
    for step in steps:
        for key in ("loss", "grad_norm"):
            value, reference = rows[step][key], expected[step][key]
            assert abs(value - reference) <= 1e-5 * max(1.0, abs(reference)), (step, key, value, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, no FSDP, two micro-batches per step."""
    root = tmp_path_factory.mktemp("sharded_training")
    run_on_ranks(_train, 1, _common(root) + [f"run.dir={root / 'reference'}"])
    return root


@pytest.mark.slow
def test_fsdp_ssp2_run_matches_one_rank_and_resumes_on_one_rank(reference, tmp_path):
    """osp-train with parallel.fsdp=true at ssp=2 logs the single-rank losses and gradient norms; its step-2
    checkpoint, resumed on one rank without FSDP, continues with the single-rank losses and ends with the same
    weights, EMA and AdamW state."""
    root = reference
    sharded = tmp_path / "fsdp_ssp2"
    run_on_ranks(_train, 2, _common(root) + [f"run.dir={sharded}", "parallel.ssp=2", "parallel.fsdp=true"])
    _assert_same_steps(sharded, root / "reference", range(1, STEPS + 1))
    resumed = tmp_path / "resumed"
    run_on_ranks(_train, 1, _common(root) + [f"run.dir={resumed}",
                                             f"checkpoint.resume={sharded / 'checkpoints' / 'step_00000002'}"])
    _assert_same_steps(resumed, root / "reference", range(3, STEPS + 1))
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_training_state(resumed / final, root / "reference" / final)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from torch.distributed.checkpoint import FileSystemWriter

real_write, calls = FileSystemWriter.write_data, []

def write_then_die(self, plan, planner):
    calls.append(plan)
    if len(calls) == 2:  # the step-4 checkpoint, written in the background: the job is killed mid-write
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, plan, planner)

FileSystemWriter.write_data = write_then_die
from osp_megatron.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_async_save_resumes_from_previous_checkpoint(reference, tmp_path):
    """checkpoint.async_save=true: a kill -9 while the step-4 checkpoint is being written leaves step 2 the
    newest loadable checkpoint (the half-written one is never published); running again resumes there and
    reproduces the uninterrupted losses."""
    root = reference
    run_dir = tmp_path / "async"
    args = ["--config", EXAMPLE, *_common(root), f"run.dir={run_dir}", "checkpoint.async_save=true"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args], cwd=tmp_path, timeout=600,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert not (checkpoints / "step_00000004").exists() and (checkpoints / "step_00000004.tmp").is_dir()
    result, = run_on_ranks(_train, 1, _common(root) + [f"run.dir={run_dir}", "checkpoint.async_save=true"])
    assert result["status"] == "finished" and result["step"] == STEPS
    _assert_same_steps(run_dir, root / "reference", range(1, STEPS + 1))
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert_same_training_state(checkpoints / f"step_{STEPS:08d}", root / "reference" / "checkpoints" / f"step_{STEPS:08d}")
