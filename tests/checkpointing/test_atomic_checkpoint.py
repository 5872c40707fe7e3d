"""Crash safety: a save that dies midway leaves the previous checkpoint the loadable newest one."""

import pytest
import torch

from osp_megatron.checkpointing import checkpoint as ckpt
from osp_megatron.checkpointing import writer
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.config import TrainConfig
from osp_megatron.engine.optim import build_optimizer
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel.state import ensure_single_rank_group


def _model_and_optimizer():
    ensure_single_rank_group()
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"preset": "tiny", "num_layers": 1}, "model"))
    optimizer = build_optimizer(model, TrainConfig())
    model(torch.randn(1, 16, 1, 4, 4), torch.tensor([3.0]), torch.randn(1, 4, 32)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """An exception while writing step 2 leaves step 1 as `latest`; the partial folder is never loaded, and
    the next successful save replaces it."""
    model, optimizer = _model_and_optimizer()
    first = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, rank_state={"step": 1})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    real_save = writer.save_tensors

    def dying_save(folder, tensors, *args, **kwargs):
        # The tensors are written, then the disk fills before the checkpoint is published.
        real_save(folder, tensors, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(writer, "save_tensors", dying_save)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, rank_state={"step": 2})
    assert (tmp_path / "checkpoints" / "step_00000002.tmp").is_dir()
    assert ckpt.latest_checkpoint(tmp_path) == first
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.read_metadata(tmp_path / "checkpoints" / "step_00000002.tmp")
    with pytest.raises(ConfigError, match="checkpoint .*absent' does not exist"):
        ckpt.read_metadata(tmp_path / "checkpoints" / "absent")

    _, rank_state = ckpt.load_checkpoint(first, model, optimizer)
    assert rank_state["step"] == 1
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name])

    monkeypatch.setattr(writer, "save_tensors", real_save)
    second = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, rank_state={"step": 2})
    assert ckpt.latest_checkpoint(tmp_path) == second
    assert not (tmp_path / "checkpoints" / "step_00000002.tmp").exists()


def test_optimizer_state_round_trips(tmp_path):
    """Adam moments and step counts saved with a checkpoint load back exactly."""
    model, optimizer = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 5, model, optimizer)
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    fresh = build_optimizer(model, TrainConfig())
    ckpt.load_checkpoint(path, model, fresh)
    for param in model.parameters():
        for key, value in before[id(param)].items():
            assert torch.equal(fresh.state[param][key].cpu(), value.cpu()), key
