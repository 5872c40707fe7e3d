"""Sequence parallelism (SSP x Ulysses, with TP and DP): every layout computes what one rank computes.

Checked twice: the model's forward and every parameter gradient (run_on_ranks), and osp-train itself.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.tensorboard  # noqa: F401  (imported once here so the forked osp-train ranks start fast)
from megatron.core import parallel_state

from osp_megatron.checkpointing.offline import read_checkpoint_tensors
from osp_megatron.checkpointing.sharded import partition_dim
from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import from_dict
from osp_megatron.engine.config import load_job_config
from osp_megatron.engine.data import ensure_synthetic_data
from osp_megatron.engine.optim import average_gradients
from osp_megatron.engine.parallelize import parallelize_dit
from osp_megatron.engine.ranks import free_port, run_on_ranks
from osp_megatron.models.builder import build_model
from osp_megatron.models.config import ModelConfig
from osp_megatron.parallel import state
from osp_megatron.parallel.ssp import check_sequence_parallel_layout
from osp_megatron.parallel.state import ParallelConfig, init_distributed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_t2v.yaml"

# (tensor, ssp, ulysses, data): the layouts the tiny example with model.sparse_ratio=2 must admit.
LAYOUTS = {
    "S2": (1, 2, 1, 1),
    "S4": (1, 4, 1, 1),
    "U2": (1, 1, 2, 1),
    "S2U2": (1, 2, 2, 1),
    "TP2S2": (2, 2, 1, 1),
    "DP2S2": (1, 2, 1, 2),
}

# Model cases of the direct test: the tiny hybrid on the example's grid, a padded grid whose Ulysses chunks
# do not align with the pattern switch (T*Hp/P^2 = 1), consecutive full blocks after a group block and
# absolute positions, a
# full-only model, and a sparse-ratio model whose blocks are all full (row-major order, unpadded grid).
CASES = [
    ({"sparse_ratio": 2}, (3, 16, 16)),
    (
        {
            "sparse_ratio": 2,
            "num_layers": 4,
            "block_layout": ["token", "group", "full", "full"],
            "absolute_positions": True,
        },
        (1, 6, 8),
    ),
    ({"sparse_ratio": 1}, (3, 16, 16)),
    ({"sparse_ratio": 2, "num_layers": 2, "block_layout": ["full", "full"]}, (1, 8, 12)),
]


# -- direct: forward output and all parameter gradients ---------------------------------------------------
def _full_gradient(param, tp):
    grad, dim = param.grad, partition_dim(param)
    if dim is None or tp == 1:
        return grad
    pieces = [torch.empty_like(grad) for _ in range(tp)]
    torch.distributed.all_gather(pieces, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=dim)


def _forward_and_gradients(rank, world_size, layout, replicas):
    """Each data-parallel replica r takes batch r; gradients are reduced as the trainer reduces them."""
    tensor, ssp, ulysses, data = layout
    init_distributed(ParallelConfig(tensor=tensor, ssp=ssp, ulysses=ulysses))
    replica = parallel_state.get_data_parallel_rank() if world_size > 1 else 0
    results = []
    for overrides, latent_shape in CASES:
        config = from_dict(ModelConfig, {"preset": "tiny", "full_blocks": 1, **overrides}, "model")
        torch.manual_seed(7)
        model = build_model(config)
        parallelize_dit(model)  # the token layout of these SSP x Ulysses groups, applied from outside
        torch.manual_seed(8)
        for param in model.parameters():  # make every weight matter (the output head starts at zero)
            if partition_dim(param) is None:
                torch.nn.init.normal_(param, std=0.05)
        outputs = []
        batches = range(replicas) if world_size == 1 else [replica]
        for index in batches:
            generator = torch.Generator().manual_seed(100 + index)
            latents = torch.randn(2, 16, *latent_shape, generator=generator)
            text, target = torch.randn(2, 32, 32, generator=generator), torch.randn(latents.shape, generator=generator)
            out = model(latents, torch.tensor([30.0, 800.0]), text)
            ((out - target).square().mean() / len(batches)).backward()
            outputs.append(out.detach().numpy())
        group = state.gradient_reduction_group()
        average_gradients(model, group, torch.distributed.get_world_size(group))
        grads = {name: _full_gradient(param, tensor).numpy() for name, param in model.named_parameters()}
        results.append((outputs, grads if rank == 0 else None))
    return results


@pytest.fixture(scope="module")
def single_rank_reference():
    return {replicas: run_on_ranks(_forward_and_gradients, 1, (1, 1, 1, 1), replicas)[0] for replicas in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_and_gradients_equal_single_rank(name, single_rank_reference):
    """Under each layout every rank's output and every parameter's reduced gradient equal one rank's (1e-5),
    for the hybrid model (padded and unpadded grids) and a full-only model; with DP=2 the single rank runs
    both replicas' batches."""
    layout = LAYOUTS[name]
    tensor, ssp, ulysses, data = layout
    ranks = run_on_ranks(_forward_and_gradients, tensor * ssp * ulysses * data, layout, data)
    reference = single_rank_reference[data]
    for case, (expected_outputs, expected_grads) in enumerate(reference):
        for rank, results in enumerate(ranks):
            outputs, _ = results[case]
            replica = (rank // (tensor * ssp * ulysses)) if data > 1 else 0
            np.testing.assert_allclose(
                outputs[0],
                expected_outputs[replica],
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{name} case {case} rank {rank} output",
            )
        grads = ranks[0][case][1]
        assert grads.keys() == expected_grads.keys()
        for param_name, expected in expected_grads.items():
            scale = max(float(np.abs(expected).max()), 1e-3)
            np.testing.assert_allclose(
                grads[param_name],
                expected,
                rtol=1e-4,
                atol=1e-5 * scale,
                err_msg=f"{name} case {case} gradient of {param_name}",
            )


# -- through osp-train --------------------------------------------------------------------------------------
def _train_overrides(data_dir, run_dir, layout):
    tensor, ssp, ulysses, _ = layout
    return [
        "--config",
        str(EXAMPLE),
        "model.sparse_ratio=2",
        "train.steps=2",
        "checkpoint.interval=1",
        "checkpoint.resume=none",
        "train.sample_at_end=false",
        "train.progress=false",
        "train.device=cpu",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.lr=1e-3",
        f"data.path={data_dir}",
        "train.eval_interval=0",
        "data.synthetic_num_samples=8",
        "data.synthetic_samples_per_shard=8",
        f"run.dir={run_dir}",
        f"parallel.tensor={tensor}",
        f"parallel.ssp={ssp}",
        f"parallel.ulysses={ulysses}",
    ]


def _osp_train(rank, world_size, argv):
    """One rank of osp-train (its console entry point) under run_on_ranks' torchrun-style environment."""
    from osp_megatron.training.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()[-3000:]


def _run_train(data_dir, run_dir, layout):
    tensor, ssp, ulysses, data = layout
    results = run_on_ranks(_osp_train, tensor * ssp * ulysses * data, _train_overrides(data_dir, run_dir, layout))
    for code, stderr in results:
        assert code == 0, stderr
    return run_dir


def _metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def _weights(run_dir, step):
    return read_checkpoint_tensors(Path(run_dir) / "checkpoints" / f"step_{step:08d}", "model")


def _assert_same_run(run_dir, reference_dir):
    rows, expected_rows = _metrics(run_dir), _metrics(reference_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected_rows] == [1, 2]
    for row, expected in zip(rows, expected_rows):
        assert abs(row["loss"] - expected["loss"]) <= 1e-5 * max(1.0, abs(expected["loss"])), (row, expected)
        assert abs(row["grad_norm"] - expected["grad_norm"]) <= 1e-5 * max(1e-3, expected["grad_norm"]), (row, expected)
    for step in (1, 2):
        weights, expected = _weights(run_dir, step), _weights(reference_dir, step)
        assert weights.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"step {step} {name}")


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    """Shared synthetic shards, and the reference runs: one rank, and plain DP=2 for the DP=2 layouts."""
    root = tmp_path_factory.mktemp("sequence_parallel_train")
    data_dir = root / "data"
    ensure_synthetic_data(load_job_config(EXAMPLE, _train_overrides(data_dir, root, (1, 1, 1, 1))[2:]).data)
    references = {
        1: _run_train(data_dir, root / "reference", (1, 1, 1, 1)),
        2: _run_train(data_dir, root / "reference_dp2", (1, 1, 1, 2)),
    }
    return root, data_dir, references


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_osp_train_layout_equals_single_rank(name, train_runs):
    """osp-train with the tiny example (model.sparse_ratio=2) under each layout logs the single-rank losses and
    gradient norms and saves the same step-1 and step-2 weights (fp32, 1e-5); the DP=2 layouts are compared
    with the plain DP=2 run, which splits the data and noise the same way."""
    root, data_dir, references = train_runs
    layout = LAYOUTS[name]
    run_dir = _run_train(data_dir, root / name, layout)
    _assert_same_run(run_dir, references[layout[3]])
    row = _metrics(run_dir)[0]
    assert row["comm/context/all_gather_bytes"] > 0 and row["comm/total_bytes"] > 0
    if layout[1] > 1:
        assert row["comm/ssp/all_to_all_bytes"] > 0


@pytest.mark.slow
def test_torchrun_launch_equals_single_rank(train_runs):
    """`torchrun --nproc_per_node 2 -m osp_megatron.training.cli ... parallel.ssp=2` equals the single-rank run."""
    root, data_dir, references = train_runs
    run_dir = root / "torchrun_S2"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "osp_megatron.training.cli",
        *_train_overrides(data_dir, run_dir, LAYOUTS["S2"]),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_same_run(run_dir, references[1])


# -- refused layouts ------------------------------------------------------------------------------------------
def _tiny(**fields):
    return from_dict(ModelConfig, {"preset": "tiny", "sparse_ratio": 2, **fields}, "model")


@pytest.mark.parametrize(
    "model_fields, grid, layout, message",
    [
        ({}, (3, 8, 8), (1, 3, 1), "parallel.ssp=3 must divide model.sparse_ratio^2 = 4"),
        ({}, (3, 8, 8), (1, 1, 8), "model.num_heads=4 is not divisible by parallel.tensor x parallel.ulysses = 1 x 8"),
        ({}, (3, 8, 8), (2, 4, 1), "parallel.tensor x parallel.ssp x parallel.ulysses = 2 x 4 x 1 = 8"),
        ({"num_heads": 8, "dim": 128}, (1, 2, 2), (1, 1, 8), "subsequences of 4 tokens, which parallel.ulysses=8"),
        ({"sparse_ratio": 1}, (3, 5, 7), (1, 2, 1), "3x5x7 = 105 tokens cannot be split evenly"),
    ],
)
def test_unworkable_layouts_are_refused(model_fields, grid, layout, message):
    """A layout that cannot work is a ConfigError naming the wrong number and what would work."""
    tensor, ssp, ulysses = layout
    with pytest.raises(ConfigError, match="use|choose") as error:
        check_sequence_parallel_layout(_tiny(**model_fields), grid, tensor, ssp, ulysses)
    assert message in str(error.value)


@pytest.mark.slow
def test_osp_train_refuses_unworkable_layout_at_start_up(tmp_path):
    """osp-train exits with status 2 and the reason, before any work, when full layers cannot split the heads."""
    argv = _train_overrides(tmp_path / "data", tmp_path / "run", (2, 4, 1, 1))
    ((code, stderr),) = run_on_ranks(_osp_train, 1, argv)
    assert code == 2 and "parallel.tensor x parallel.ssp x parallel.ulysses = 2 x 4 x 1 = 8" in stderr
    assert not (tmp_path / "data").exists()
