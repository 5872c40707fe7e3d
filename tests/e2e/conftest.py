"""The README's main job, run once per test session and shared by the end-to-end tests that judge it.

The main job and the two jobs that start from its checkpoint (the GRPO and LoRA examples) are single-threaded
programs of minutes: when the session selects their tests they run one after another in a background thread
from the start of the session, on the core the other tests leave idle, and each test waits for its job.
"""

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@dataclass
class MainJob:
    run_dir: Path
    data_dir: Path
    seconds: float
    stdout: str


def run_module(args, cwd, timeout=900, started=None):
    """`python -m ARGS` in `cwd`; fails the test with the output's tail unless it exits with 0. `started` is
    handed the process as soon as it runs (so that it can be stopped from elsewhere)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        if started is not None:
            started(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def main_job_args(root: Path) -> list[str]:
    """osp-train on examples/tiny_t2v.yaml exactly as the README runs it, with its folders under `root`."""
    return [
        "osp_megatron.training.cli",
        "--config",
        str(EXAMPLES / "tiny_t2v.yaml"),
        f"run.dir={root / 'run'}",
        f"data.path={root / 'data'}",
        f"data.eval_path={root / 'eval'}",
        "train.progress=false",
    ]


def grpo_example_args(main_root: Path, root: Path) -> list[str]:
    """osp-grpo on examples/grpo_tiny.yaml as shipped, from the main job's checkpoint, its run folder in `root`."""
    return [
        "osp_megatron.rl.cli",
        "--config",
        str(EXAMPLES / "grpo_tiny.yaml"),
        f"run.dir={root / 'run'}",
        f"checkpoint.load={main_root / 'run'}",
        "train.progress=false",
        "train.sample_at_end=false",
    ]


def lora_example_args(main_root: Path, root: Path) -> list[str]:
    """osp-train on examples/train_lora_tiny.yaml as shipped, from the main job's checkpoint and shards, its
    run folder in `root`."""
    return [
        "osp_megatron.training.cli",
        "--config",
        str(EXAMPLES / "train_lora_tiny.yaml"),
        f"run.dir={root / 'run'}",
        f"checkpoint.load={main_root / 'run'}",
        f"data.path={main_root / 'data'}",
        "train.progress=false",
    ]


class BackgroundJobs:
    """Named commands run one after another in a thread; result(name) waits for one (or runs it in the
    calling test when the thread was never started). Each job runs in its own folder, its run folder in it."""

    def __init__(self):
        self.plan: dict[str, tuple[list[str], Path]] = {}
        self.done: dict[str, tuple[subprocess.CompletedProcess | BaseException, float]] = {}
        self.finished = threading.Condition()
        self.thread = None
        self.process = None  # the job running now

    def add(self, name: str, args: list[str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.plan[name] = (args, folder)

    def folder(self, name: str) -> Path:
        return self.plan[name][1]

    def _run(self, name: str) -> None:
        args, folder = self.plan[name]
        started = time.perf_counter()
        try:
            outcome = run_module(args, folder, started=lambda process: setattr(self, "process", process))
        except BaseException as error:  # handed to the test that waits for it
            outcome = error
        with self.finished:
            self.done[name] = (outcome, time.perf_counter() - started)
            self.finished.notify_all()

    def start(self, names: list[str]) -> None:
        def work():
            for name in names:
                self._run(name)

        self.thread = threading.Thread(target=work, name="e2e-background-jobs", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the job still running when the session ends early (a failure under -x, Ctrl-C): it would
        otherwise outlive pytest."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, float]:
        if self.thread is None and name not in self.done:
            self._run(name)
        with self.finished:
            self.finished.wait_for(lambda: name in self.done)
        outcome, seconds = self.done[name]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome, seconds


_JOBS: BackgroundJobs | None = None


def _jobs(config) -> BackgroundJobs:
    global _JOBS
    if _JOBS is None:
        root = config._tmp_path_factory.mktemp("e2e_jobs")
        _JOBS = BackgroundJobs()
        main = root / "main_job"
        _JOBS.add("main_job", main_job_args(main), main)
        _JOBS.add("grpo_example", grpo_example_args(main, root / "grpo"), root / "grpo")
        _JOBS.add("lora_example", lora_example_args(main, root / "lora"), root / "lora")
    return _JOBS


# The fixtures that wait for background jobs, each with the jobs it needs; a job has its fixture's name and the
# jobs run in this order.
_NEEDS = {
    "main_job": ["main_job"],
    "grpo_example": ["main_job", "grpo_example"],
    "lora_example": ["main_job", "lora_example"],
}


def _waits(item) -> bool:
    return any(fixture in _NEEDS for fixture in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait for background jobs run last, when the jobs are furthest along."""
    items[:] = [item for item in items if not _waits(item)] + [item for item in items if _waits(item)]


def pytest_collection_finish(session):
    """Start the background jobs the selected tests wait for, in the order of _NEEDS."""
    wanted = {fixture for item in session.items for fixture in getattr(item, "fixturenames", ()) if fixture in _NEEDS}
    names = [name for name in _NEEDS if any(name in _NEEDS[fixture] for fixture in wanted)]
    if names and not session.config.option.collectonly:
        _jobs(session.config).start(names)


def pytest_sessionfinish(session):
    if _JOBS is not None:
        _JOBS.stop()


@pytest.fixture(scope="session")
def run_python_module():
    """run_module, for tests that call console entry points."""
    return run_module


@pytest.fixture(scope="session")
def main_job(request):
    """The README's main job (osp-train on examples/tiny_t2v.yaml), finished."""
    jobs = _jobs(request.config)
    result, seconds = jobs.result("main_job")
    folder = jobs.folder("main_job")
    return MainJob(folder / "run", folder / "data", seconds, result.stdout)


@pytest.fixture(scope="session")
def grpo_example(request, main_job):
    """The run folder of examples/grpo_tiny.yaml as shipped, from the main job's checkpoint, finished."""
    jobs = _jobs(request.config)
    result, _ = jobs.result("grpo_example")
    return jobs.folder("grpo_example") / "run", result.stdout


@pytest.fixture(scope="session")
def lora_example(request, main_job):
    """The run folder and output of examples/train_lora_tiny.yaml as shipped, from the main job, finished."""
    jobs = _jobs(request.config)
    result, _ = jobs.result("lora_example")
    return jobs.folder("lora_example") / "run", result.stdout
