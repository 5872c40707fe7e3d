"""The job loop osp-train and osp-grpo share: exit_interval saves and ends the run, a stop signal saves and ends
it, and running again resumes to the uninterrupted run's losses and weights, each step logged once; a finished
run says so. One test, both jobs."""

from pathlib import Path

import pytest
import torch

from osp_megatron.engine.metrics import read_metrics
from osp_megatron.engine.ranks import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


class StopDuringStep:
    """Stands in for GracefulStop: a stop signal arrives during step `at`."""

    signal_name = "SIGTERM"

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def agreed(self, device=None):
        self.calls += 1  # call 1: before the loop; call k + 1: after step k
        return self.calls == self.at + 1


def _overrides(job: str, run_dir: Path, extra=()) -> list[str]:
    common = [
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        "train.progress=false",
        "train.sample_at_end=false",
        "model.num_layers=2",
        "train.ema_decay=0.9",
        "checkpoint.interval=0",
        "train.cpu_threads=0",
        *extra,
    ]
    if job == "osp-train":
        return common + [
            f"data.path={run_dir.parent / 'data'}",
            "train.eval_interval=0",
            "data.synthetic_num_samples=32",
            "data.synthetic_samples_per_shard=16",
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
        ]
    from osp_megatron.testing import tiny_grpo_overrides

    return tiny_grpo_overrides(run_dir, STEPS, [*common[1:], "grpo.window_shift_interval=1"])


def _run(rank, world_size, job, run_dir, stop_at=None, extra=()):
    """One run of `job` into run_dir; returns (result, trained weights)."""
    if job == "osp-train":
        from osp_megatron.engine.config import load_job_config
        from osp_megatron.training.trainer import Trainer

        trainer = Trainer(load_job_config(str(ROOT / "examples" / "tiny_t2v.yaml"), _overrides(job, run_dir, extra)))
    else:
        from osp_megatron.rl.config import load_grpo_config
        from osp_megatron.rl.trainer import GRPOTrainer

        trainer = GRPOTrainer(
            load_grpo_config(str(ROOT / "examples" / "grpo_tiny.yaml"), _overrides(job, run_dir, extra))
        )
    result = trainer.train(StopDuringStep(stop_at) if stop_at else None)
    return result, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("job", ["osp-train", "osp-grpo"])
def test_stop_exit_interval_and_resume_behave_alike_in_both_jobs(tmp_path, job):
    """Stopped during step 1: saved, status stopped. Then exit_interval=2: saved at 2, status exit_interval. Then
    to the end: the losses (rewards) of every step equal the uninterrupted run's, each step logged once, the final
    weights identical. Once more: already finished, nothing redone."""
    straight = run_on_ranks(_run, 1, job, tmp_path / "straight")[0]
    run_dir = tmp_path / "interrupted"
    stopped = run_on_ranks(_run, 1, job, run_dir, 1)[0][0]
    assert (stopped["status"], stopped["step"]) == ("stopped", 1)
    assert (run_dir / "checkpoints" / "step_00000001").is_dir()
    # train.exit_interval=2: saves at step 2 and ends the run there.
    exited = run_on_ranks(_run, 1, job, run_dir, None, ["train.exit_interval=2"])[0][0]
    assert (exited["status"], exited["step"]) == ("exit_interval", 2)
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    finished, weights = run_on_ranks(_run, 1, job, run_dir)[0]
    assert (finished["status"], finished["step"]) == ("finished", STEPS)
    rows, expected = read_metrics(run_dir / "metrics.jsonl"), read_metrics(tmp_path / "straight" / "metrics.jsonl")
    key = "loss" if job == "osp-train" else "reward"
    assert [row["step"] for row in rows] == [row["step"] for row in expected] == list(range(1, STEPS + 1))
    for row, reference in zip(rows, expected):
        assert row[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9)
    for name, weight in straight[1].items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=0)
    again = run_on_ranks(_run, 1, job, run_dir)[0][0]
    assert (again["status"], again["step"]) == ("already_finished", STEPS)
