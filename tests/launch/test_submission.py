"""osp-launch --dry-run: the sbatch script and layout for multi-node jobs, cluster files and flags, and the
errors a bad setting gets."""

import re
from pathlib import Path

import pytest

from osp_launch import jobs
from osp_launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "examples/tiny_t2v.yaml", "parallel.tensor=2"]


def dry_run(capsys, *args) -> str:
    assert main(["--dry-run", *args]) == 0
    return capsys.readouterr().out


def sbatch_options(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M))


@pytest.mark.parametrize("nodes", [2, 4])
def test_multi_node_layout_one_task_per_gpu(capsys, nodes):
    """N nodes x 8 GPUs: N x 8 ranks, one srun task per GPU, the stop signal 300 s before the time limit,
    requeue on, the job's module and arguments in every task, logs per job id and task."""
    out = dry_run(
        capsys,
        "--nodes",
        str(nodes),
        "--partition",
        "h200",
        "--account",
        "proj",
        "--qos",
        "high",
        "--time",
        "1-00:00:00",
        "osp-train",
        *TINY,
    )
    options = sbatch_options(out)
    assert options["nodes"] == str(nodes) and options["ntasks-per-node"] == "8" and options["gpus-per-node"] == "8"
    assert (options["partition"], options["account"], options["qos"]) == ("h200", "proj", "high")
    assert options["time"] == "1440" and options["signal"] == "USR1@300" and "requeue" in options
    assert options["job-name"] == "osp-train" and "wckey" not in options
    assert f"{nodes} node(s) x 8 task(s) = {nodes * 8} ranks" in out
    assert (
        "every task runs: python -m osp_megatron.training.cli --config examples/tiny_t2v.yaml parallel.tensor=2" in out
    )
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "-m submitit.core._submit" in srun and "%j_%t_log.out" in srun
    assert "export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}" in out
    # One dump folder per run of the job: a requeued run keeps the job id but not the earlier run's dumps.
    assert re.search(
        r"export TORCH_(FR_DUMP_TEMP_FILE|NCCL_DEBUG_INFO_TEMP_FILE)=.*/\$\{SLURM_JOB_ID\}/"
        r"flight_recorder/restart_\$\{SLURM_RESTART_COUNT:-0\}/rank_",
        out,
    )


def test_cluster_file_and_flags(capsys, tmp_path):
    """The cluster file gives defaults; flags win; --env and --sbatch add to the file's lists; setup lines and
    environment come before srun in the script."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "nodes: 4\npartition: batch\nsetup: ['source /opt/osp/bin/activate']\n"
        "env: {NCCL_IB_HCA: mlx5}\nsbatch_lines: ['--constraint=h200']\nstop_warning_seconds: 600\n"
    )
    out = dry_run(
        capsys,
        "--cluster",
        str(cluster),
        "--nodes",
        "2",
        "--env",
        "NCCL_NVLS_ENABLE=1",
        "--sbatch=--mail-type=END",
        "--no-requeue",
        "osp-train",
        *TINY,
    )
    options = sbatch_options(out)
    assert options["nodes"] == "2" and options["partition"] == "batch"
    assert options["constraint"] == "h200" and options["mail-type"] == "END" and options["signal"] == "USR1@600"
    assert "no-requeue" in options and "requeue" not in options and "rank 0 requeues" not in out
    lines = out.splitlines()
    setup = lines.index("source /opt/osp/bin/activate")
    assert (
        setup
        < lines.index("export NCCL_IB_HCA=mlx5")
        < next(i for i, line in enumerate(lines) if line.startswith("srun"))
    )
    assert "export NCCL_NVLS_ENABLE=1" in lines and "export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}" not in lines


@pytest.fixture
def every_job_installed(monkeypatch):
    """Jobs whose modules are still being merged (osp-data) count as installed: the dry run only needs names."""
    monkeypatch.setattr(jobs.importlib.util, "find_spec", lambda name: object())


def test_cpu_tasks_and_container(capsys, every_job_installed):
    """Without GPUs the task count is explicit and no GPUs are requested; a container image runs every task in
    pyxis with the container's python."""
    out = dry_run(
        capsys,
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--container-image",
        "nvcr.io#osp:1",
        "--container-mounts",
        "/lustre:/lustre",
        "osp-data",
        "encode",
        "--config",
        "encode.yaml",
    )
    options = sbatch_options(out)
    assert options["ntasks-per-node"] == "2" and "gpus-per-node" not in options
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io#osp:1" in srun and "--container-mounts=/lustre:/lustre" in srun
    assert " python -u -m submitit.core._submit" in srun
    assert "python -m osp_data.cli encode --config encode.yaml" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time", "soon"], "cluster.time: 'soon' is not a Slurm time"),
        (["--time", "00:04:00"], "cluster.stop_warning_seconds: must be between 0 and the time limit (240 s)"),
        (["--nodes", "0"], "cluster.nodes: must be >= 1"),
        (["--env", "NOVALUE"], "--env 'NOVALUE': expected NAME=VALUE"),
        (["--sbatch=constraint=h200"], "is not a long sbatch option"),
    ],
)
def test_bad_settings_are_named(capsys, args, message):
    assert main(["--dry-run", *args, "osp-train", *TINY]) == 2
    assert message in capsys.readouterr().err


def test_unknown_cluster_key_is_named(capsys, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodez: 2\n")
    assert main(["--dry-run", "--cluster", str(cluster), "osp-train"]) == 2
    assert "unknown config key 'cluster.nodez'" in capsys.readouterr().err


def test_job_whose_module_is_missing(capsys, monkeypatch):
    """A job whose module this checkout lacks is refused before anything is submitted, naming the module."""
    monkeypatch.setattr(jobs, "JOB_MODULES", {**jobs.JOB_MODULES, "osp-grpo": "osp_megatron.no_such_module.cli"})
    assert main(["--dry-run", "osp-grpo", "--config", "grpo.yaml"]) == 2
    assert "osp_megatron.no_such_module.cli, which is not installed here" in capsys.readouterr().err


def test_submitting_without_slurm_says_so(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["--nodes", "1", "osp-train", *TINY]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_example_cluster_file_is_valid(capsys):
    """examples/cluster.yaml loads and renders: its setup, environment and sbatch lines reach the script."""
    out = dry_run(capsys, "--cluster", str(ROOT / "examples" / "cluster.yaml"), "osp-train", *TINY)
    options = sbatch_options(out)
    assert options["partition"] == "h200" and options["constraint"] == "h200" and "exclusive" in options
    assert "source /shared/osp/venv/bin/activate" in out and "export NCCL_IB_HCA=mlx5" in out
