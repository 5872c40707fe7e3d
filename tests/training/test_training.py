"""Training: the loss falls on a fixed batch, and a run stopped and resumed equals an uninterrupted one."""

import json

import pytest
import torch

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.config import load_job_config
from osp_megatron.engine.optim import build_optimizer, lr_at
from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.training.flow_matching import flow_matching_loss


def _fixed_batch_losses(rank, world_size):
    from osp_megatron.engine.config import TrainConfig
    from osp_megatron.parallel.state import ensure_single_rank_group

    ensure_single_rank_group()
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "num_layers": 2}, "model"))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3))
    latents, text = torch.randn(4, 16, 2, 8, 8), torch.randn(4, 32, 32)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = flow_matching_loss(model, latents, text, torch.Generator().manual_seed(5))  # same noise each step
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_one_step_reduces_loss_on_a_fixed_batch():
    """After one AdamW step the same batch with the same noise has a lower flow-matching loss."""
    ((before, after),) = run_on_ranks(_fixed_batch_losses, 1)
    assert after < before


def test_learning_rate_schedule_warms_up_then_decays():
    """Linear warm-up reaches train.lr, cosine decay ends at train.min_lr."""
    cfg = load_job_config(
        "examples/tiny_t2v.yaml", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"]
    ).train
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(100, cfg) - 0.1) < 1e-9 and lr_at(50, cfg) < lr_at(20, cfg)


def _train(rank, world_size, overrides):
    from osp_megatron.training.trainer import Trainer

    config = load_job_config("examples/tiny_t2v.yaml", overrides)
    return Trainer(config).train()


def _losses(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """Stopping at step 3 (train.exit_interval) and resuming gives the uninterrupted run's losses (fp32, 1e-6)."""
    common = [
        "train.steps=6",
        "train.sample_at_end=false",
        "train.progress=false",
        "model.num_layers=2",
        f"data.path={tmp_path / 'data'}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=40",
        "data.synthetic_samples_per_shard=16",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.ema_decay=0.9",
        "checkpoint.interval=0",
    ]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_on_ranks(_train, 1, common + [f"run.dir={straight}"])
    first = run_on_ranks(_train, 1, common + [f"run.dir={stopped}", "train.exit_interval=3"])[0]
    assert first["status"] == "exit_interval" and first["step"] == 3
    run_on_ranks(_train, 1, common + [f"run.dir={stopped}"])
    expected, resumed = _losses(straight), _losses(stopped)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert abs(expected[step] - resumed[step]) <= 1e-6, (step, expected[step], resumed[step])
    a = torch.load(straight / "checkpoints" / "step_00000006" / "ranks" / "rank00000.pt", weights_only=False)
    b = torch.load(stopped / "checkpoints" / "step_00000006" / "ranks" / "rank00000.pt", weights_only=False)
    assert a["data"] == b["data"]


def test_noise_depends_only_on_seed_and_sample_index():
    """A sample's noise and noise level are the same whichever batch, position or micro-batch it is drawn in
    (so data-parallel size and accumulation change nothing), and differ between samples and seeds."""
    from osp_megatron.training.flow_matching import PerSampleNoise

    latents = torch.zeros(4, 16, 2, 4, 4)
    noise, sigmas = PerSampleNoise(7, torch.tensor([5, 6, 7, 8])).draw(latents, 3.0, 0.0, 1.0)
    parts = [
        PerSampleNoise(7, torch.tensor(indices)).draw(latents[: len(indices)], 3.0, 0.0, 1.0)
        for indices in ([8, 5], [7], [6])
    ]
    for (part_noise, part_sigmas), positions in zip(parts, ([3, 0], [2], [1])):
        assert torch.equal(part_noise, noise[positions]) and torch.equal(part_sigmas, sigmas[positions])
    assert not torch.equal(noise[0], noise[1]) and 0 < float(sigmas.min()) and float(sigmas.max()) < 1
    other, _ = PerSampleNoise(8, torch.tensor([5, 6, 7, 8])).draw(latents, 3.0, 0.0, 1.0)
    assert not torch.equal(other, noise)


def _dropped_text(rank, world_size, overrides):
    from osp_megatron.models.text_encoder import build_text_encoder
    from osp_megatron.training.trainer import Trainer

    config = load_job_config("examples/tiny_t2v.yaml", overrides)
    trainer = Trainer(config)
    text = torch.randn(64, config.model.text_len, config.model.text_dim)
    out = trainer._drop_text(text, torch.arange(1000, 1064))
    again = trainer._drop_text(text, torch.arange(1000, 1064))
    encoder = build_text_encoder(None, config.model.text_dim, config.model.text_len, seed=config.data.synthetic_seed)
    null = encoder.encode([config.sample.negative_prompt])[0][0]
    threads = torch.get_num_threads()
    dropped = [bool(torch.equal(row, null)) for row in out]
    kept = [bool(torch.equal(row, original)) for row, original in zip(out, text)]
    return dropped, kept, bool(torch.equal(out, again)), threads


@pytest.mark.slow
def test_text_dropout_swaps_in_the_unconditional_states_per_sample(tmp_path):
    """train.text_dropout replaces about that share of the samples' text states, chosen by sample index (the same
    again), by the encoder states of sample.negative_prompt that guidance's unconditional branch uses. (The same
    CPU trainer also takes train.cpu_threads: the worker starts with one thread and ends with the two asked.)"""
    overrides = [
        "train.text_dropout=0.25",
        "model.num_layers=1",
        f"run.dir={tmp_path / 'run'}",
        "train.cpu_threads=2",
        f"data.path={tmp_path / 'data'}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=8",
        "data.synthetic_samples_per_shard=8",
        "model.vae=tiny-random",
    ]
    ((dropped, kept, repeatable, threads),) = run_on_ranks(_dropped_text, 1, overrides)
    assert all(d != k for d, k in zip(dropped, kept)) and repeatable and threads == 2
    assert 8 <= sum(dropped) <= 24
    with pytest.raises(ConfigError, match="train.text_dropout must be in"):
        load_job_config("examples/tiny_t2v.yaml", ["train.text_dropout=1.0"])
    with pytest.raises(ConfigError, match="train.cpu_threads must be >= 0"):
        load_job_config("examples/tiny_t2v.yaml", ["train.cpu_threads=-1"])


def _device_error(rank, world_size, overrides):
    from osp_megatron.engine.distributed import training_device

    try:
        training_device(load_job_config("examples/tiny_t2v.yaml", overrides))
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_cuda_asked_without_a_gpu_is_refused(tmp_path):
    """train.device=cuda on a machine without CUDA stops at start-up with a message naming the key."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    (message,) = run_on_ranks(
        _device_error, 1, ["train.device=cuda", "parallel.backend=gloo", f"run.dir={tmp_path / 'run'}"]
    )
    assert message == "train.device=cuda but no CUDA device is available"
