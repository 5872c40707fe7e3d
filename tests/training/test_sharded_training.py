"""osp-train with FSDP and distributed checkpoints: a tensor=2 x data=2 FSDP run logs the single-rank losses, its
checkpoint resumes on one rank and at ssp=2, and a kill during an asynchronous save resumes from the previous
checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osp_megatron.engine.metrics import read_metrics
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.testing import assert_same_training_state

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_t2v.yaml")
STEPS = 4


def _common(root: Path) -> list[str]:
    return [
        f"train.steps={STEPS}",
        "train.sample_at_end=false",
        "train.progress=false",
        "train.device=cpu",
        "model.num_layers=3",
        "model.sparse_ratio=2",
        "model.full_blocks=1",
        f"data.path={root / 'data'}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=32",
        "data.synthetic_samples_per_shard=16",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.ema_decay=0.9",
        "checkpoint.interval=2",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.adam_eps=1e-6",
    ]


def _train(rank, world_size, overrides):
    from osp_megatron.engine.config import load_job_config
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


@pytest.fixture(scope="module")
def tensor2_data2(reference):
    """osp-train with FSDP at tensor=2 x data=2 (4 ranks; each tensor-parallel rank shards its slices over its
    two data-parallel ranks), checkpointing at steps 2 and 4."""
    run_dir = reference / "fsdp_tp2_dp2"
    run_on_ranks(
        _train, 4, _common(reference) + [f"run.dir={run_dir}", "parallel.tensor=2", "parallel.fsdp=true"], timeout=1800
    )
    return run_dir


@pytest.mark.slow
def test_fsdp_with_tensor_and_data_parallel_matches_one_rank(reference, tensor2_data2):
    """FSDP x tensor=2 x data=2 logs the losses and gradient norms of one rank accumulating the same global
    batches (noise seeded per sample), and saves the same weights, EMA and AdamW state."""
    _assert_same_steps(tensor2_data2, reference / "reference", range(1, STEPS + 1))
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_training_state(tensor2_data2 / final, reference / "reference" / final)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [[], ["parallel.ssp=2", "parallel.fsdp=true", "train.ema_device=cpu"]], ids=["one_rank", "ssp2_fsdp"]
)
def test_tensor2_data2_fsdp_checkpoint_resumes_on_one_rank_and_at_ssp2(layout, reference, tensor2_data2, tmp_path):
    """The step-2 checkpoint of FSDP x tensor=2 x data=2, resumed on one rank without FSDP and at ssp=2 with
    FSDP (EMA in host memory), continues with the uninterrupted run's losses and ends with its weights, EMA and
    AdamW state. At ssp=2 the run also renders a sample and computes the held-out loss at step 3 (forward-only
    passes through the FSDP model, EMA weights swapped in and out) without changing step 4."""
    resumed = tmp_path / "resumed"
    ranks = 2 if layout else 1
    interim = (
        [
            "train.sample_interval=3",
            "sample.num_steps=2",
            "train.eval_interval=3",
            "train.eval_samples=4",
            f"data.eval_path={tmp_path / 'eval'}",
        ]
        if layout
        else []
    )
    run_on_ranks(
        _train,
        ranks,
        _common(reference)
        + layout
        + interim
        + [f"run.dir={resumed}", f"checkpoint.resume={tensor2_data2 / 'checkpoints' / 'step_00000002'}"],
        timeout=900,
    )
    _assert_same_steps(resumed, reference / "reference", range(3, STEPS + 1))
    if layout:
        assert (resumed / "samples" / "step_00000003.png").is_file()
        assert "eval_loss" in _rows(resumed)[3]
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_training_state(resumed / final, reference / "reference" / final)


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


@pytest.mark.slow
def test_kill_during_async_save_resumes_from_previous_checkpoint(reference, tmp_path):
    """checkpoint.async_save=true: a kill -9 while the step-4 checkpoint is being written leaves step 2 the
    newest loadable checkpoint (the half-written one is never published); running again resumes there and
    reproduces the uninterrupted losses."""
    root = reference
    run_dir = tmp_path / "async"
    args = ["--config", EXAMPLE, *_common(root), f"run.dir={run_dir}", "checkpoint.async_save=true"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args],
        cwd=tmp_path,
        timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert not (checkpoints / "step_00000004").exists() and (checkpoints / "step_00000004.tmp").is_dir()
    (result,) = run_on_ranks(_train, 1, _common(root) + [f"run.dir={run_dir}", "checkpoint.async_save=true"])
    assert result["status"] == "finished" and result["step"] == STEPS
    _assert_same_steps(run_dir, root / "reference", range(1, STEPS + 1))
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert_same_training_state(
        checkpoints / f"step_{STEPS:08d}", root / "reference" / "checkpoints" / f"step_{STEPS:08d}"
    )
