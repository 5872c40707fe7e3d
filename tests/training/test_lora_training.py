"""LoRA in osp-train: the checkpoint holds the adapters, their AdamW state and a reference to the frozen base (no
copy of it); a stopped run resumes exactly; the merged model equals base + (alpha / rank) B A; osp-ckpt merges and
exports it; a changed base is refused."""

import json
from pathlib import Path

import pytest
import torch

from osp_megatron.checkpointing.offline import read_checkpoint_tensors, stored_shapes
from osp_megatron.engine.metrics import read_metrics
from osp_megatron.engine.ranks import run_on_ranks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _overrides(run_dir: Path, data_dir: Path, steps: int, extra=()) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.progress=false",
        "train.sample_at_end=false",
        "model.num_layers=2",
        f"data.path={data_dir}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=32",
        "data.synthetic_samples_per_shard=16",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "checkpoint.interval=0",
        "train.cpu_threads=0",
        "train.ema_decay=0.9",
        "train.lr=1e-2",
        *extra,
    ]


class StopDuringStep:
    signal_name = "SIGTERM"

    def __init__(self, at):
        self.at, self.calls = at, 0

    def agreed(self, device=None):
        self.calls += 1
        return self.calls == self.at + 1


def _train(rank, world_size, overrides, stop_at=None):
    from osp_megatron.engine.config import load_job_config
    from osp_megatron.training.trainer import Trainer

    trainer = Trainer(load_job_config(str(ROOT / "examples" / "tiny_t2v.yaml"), overrides))
    result = trainer.train(StopDuringStep(stop_at) if stop_at else None)
    return result, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


LORA = ["lora.rank=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    run_on_ranks(_train, 1, _overrides(root / "base", root / "data", 2))
    return root


def test_lora_checkpoint_holds_adapters_and_a_base_reference(base_run, tmp_path):
    root = base_run
    result, weights = run_on_ranks(
        _train, 1, _overrides(tmp_path / "lora", root / "data", 3, [f"checkpoint.load={root / 'base'}", *LORA])
    )[0]
    assert result["status"] == "finished"
    checkpoint = tmp_path / "lora" / "checkpoints" / "step_00000003"
    stored = stored_shapes(checkpoint, "model")
    assert stored and all(".lora_A." in name or ".lora_B." in name for name in stored)  # no base weight stored
    assert set(stored_shapes(checkpoint, "ema")) == set(stored)
    assert {name.split("/", 1)[1] for name in stored_shapes(checkpoint, "optimizer")} == set(stored)
    metadata = json.loads((checkpoint / "metadata.json").read_text())
    base = root / "base" / "checkpoints" / "step_00000002"
    assert metadata["base_weights"]["path"] == str(base.resolve()) and metadata["lora"]["rank"] == 4
    assert metadata["base_weights"]["fingerprint"].startswith("manifest:")
    base_bytes = sum(f.stat().st_size for f in (base / "state").iterdir())
    lora_bytes = sum(f.stat().st_size for f in (checkpoint / "state").iterdir())
    assert lora_bytes < base_bytes / 2
    # The base is frozen: every base weight of the trained model equals the base checkpoint's.
    base_tensors = read_checkpoint_tensors(base, "model")
    for name, tensor in weights.items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, base_tensors[name.replace(".base_layer.", ".")], rtol=0, atol=0)
    # run.dir/merged: the EMA adapters folded in, as osp-ckpt merge-lora writes them.
    merged = read_checkpoint_tensors(tmp_path / "lora" / "merged", "ema")
    adapters = read_checkpoint_tensors(checkpoint, "ema")
    name = "blocks.0.self_attention.linear_q"
    expected = base_tensors[f"{name}.weight"].double() + 2.0 * (
        adapters[f"{name}.lora_B.default.weight"].double() @ adapters[f"{name}.lora_A.default.weight"].double()
    )
    torch.testing.assert_close(merged[f"{name}.weight"], expected.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged["blocks.0.mlp.linear_fc1.weight"], base_tensors["blocks.0.mlp.linear_fc1.weight"])


def test_lora_run_resumes_exactly(base_run, tmp_path):
    root = base_run

    def overrides(run):
        return _overrides(tmp_path / run, root / "data", 3, [f"checkpoint.load={root / 'base'}", *LORA])

    straight = run_on_ranks(_train, 1, overrides("straight"))[0]
    stopped = run_on_ranks(_train, 1, overrides("stopped"), 1)[0][0]
    assert (stopped["status"], stopped["step"]) == ("stopped", 1)
    resumed = run_on_ranks(_train, 1, overrides("stopped"))[0]
    assert [r["loss"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")], rel=1e-6
    )
    for name, weight in straight[1].items():
        torch.testing.assert_close(resumed[1][name], weight, rtol=0, atol=0)


def test_osp_ckpt_merges_and_exports_and_refuses_a_changed_base(base_run, tmp_path, capsys):
    from osp_ckpt.cli import main as osp_ckpt

    root = base_run
    run_on_ranks(
        _train, 1, _overrides(tmp_path / "lora", root / "data", 1, [f"checkpoint.load={root / 'base'}", *LORA])
    )
    checkpoint = tmp_path / "lora" / "checkpoints" / "step_00000001"
    assert osp_ckpt(["merge-lora", str(checkpoint), str(tmp_path / "merged")]) == 0
    assert osp_ckpt(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()
    # A base copied elsewhere is found with --base; a base whose weights changed is refused.
    import shutil

    base = root / "base" / "checkpoints" / "step_00000002"
    moved = tmp_path / "moved_base"
    shutil.copytree(base, moved)
    assert osp_ckpt(["merge-lora", str(checkpoint), str(tmp_path / "merged2"), "--base", str(moved)]) == 0
    torch.testing.assert_close(
        read_checkpoint_tensors(tmp_path / "merged2"), read_checkpoint_tensors(tmp_path / "merged")
    )
    capsys.readouterr()
    assert osp_ckpt(["merge-lora", str(checkpoint), str(tmp_path / "merged3"), "--base", str(checkpoint)]) == 2
    assert "are not those LoRA checkpoint" in capsys.readouterr().err


def test_resuming_with_other_lora_settings_is_refused(base_run, tmp_path):
    """A LoRA run's checkpoint resumes only with its own adapter settings; a full run's only without LoRA."""
    root = base_run
    lora_run = _overrides(tmp_path / "lora", root / "data", 1, [f"checkpoint.load={root / 'base'}", *LORA])
    run_on_ranks(_train, 1, lora_run)
    for changed, message in (
        ([*lora_run, "lora.rank=8", "lora.alpha=8", "train.steps=2"], "rank 4"),
        ([*lora_run, "lora=null", "train.steps=2"], "rank 4"),
    ):
        with pytest.raises(RuntimeError, match=message):
            run_on_ranks(_train, 1, changed)
    full_run = _overrides(tmp_path / "full", root / "data", 1)
    run_on_ranks(_train, 1, full_run)
    with pytest.raises(RuntimeError, match="trained every weight"):
        run_on_ranks(_train, 1, [*full_run, f"checkpoint.load={root / 'base'}", *LORA, "train.steps=2"])
