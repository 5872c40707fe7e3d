"""Communication defaults and hang diagnosis: a collective that one rank never joins times out, and the waiting
rank's report names the rank, the collective it waited in and its flight-recorder dump."""

import contextlib
import datetime
import io
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from osp_megatron.engine.ranks import run_on_ranks
from osp_megatron.parallel.diagnostics import (
    COMMUNICATION_DEFAULTS,
    FLIGHT_RECORDER_BUFFER,
    FLIGHT_RECORDER_FILE,
    apply_communication_defaults,
    collective_failure_report,
    install_collective_failure_report,
)


def test_defaults_fill_gaps_and_never_override():
    """Missing settings get their defaults (NVLink multicast off, flight recorder on); values already in the
    environment are kept."""
    environ = {"NCCL_NVLS_ENABLE": "1"}
    applied = apply_communication_defaults(environ)
    assert environ["NCCL_NVLS_ENABLE"] == "1" and "NCCL_NVLS_ENABLE" not in applied
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert int(environ[FLIGHT_RECORDER_BUFFER]) > 0 and environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert set(applied) == set(COMMUNICATION_DEFAULTS) - {"NCCL_NVLS_ENABLE"}


def test_unrelated_errors_get_no_report():
    assert collective_failure_report(ValueError("bad shape")) is None


def _rank_skips_a_collective(rank, world_size, dump_prefix):
    os.environ[FLIGHT_RECORDER_FILE] = dump_prefix
    apply_communication_defaults()
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=1))
    tensor = torch.ones(4)
    dist.all_reduce(tensor)  # collective 1: both ranks
    if rank == 1:
        time.sleep(2.5)  # never joins collective 2
        return None
    try:
        dist.all_reduce(torch.ones(3, 5))
    except Exception as error:  # noqa: BLE001 (the timeout's type differs between torch versions)
        report = collective_failure_report(error)
        install_collective_failure_report()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            sys.excepthook(type(error), error, error.__traceback__)
        return report, stderr.getvalue()
    return "collective 2 completed although rank 1 never joined it", ""


@pytest.mark.slow
def test_hung_collective_times_out_with_a_report_naming_rank_and_collective(tmp_path):
    """Rank 1 skips an all-reduce: rank 0 times out after the group's timeout; its report says rank 0 waited in
    collective #2 (an all_reduce of a [3, 5] tensor) and where its flight-recorder dump is; the dump is the
    standard format that torchfrtrace reads, and an uncaught error prints the same report before the traceback."""
    prefix = str(tmp_path / "recorder" / "rank_")
    report, hook_output = run_on_ranks(_rank_skips_a_collective, 2, prefix, timeout=120)[0]
    assert "[rank 0/2 on" in report and "collective failed" in report
    assert "[rank 0] waiting in collective #2" in report and "all_reduce" in report and "[[3, 5]]" in report
    assert f"flight recorder dump: {prefix}0" in report
    trace = pickle.loads(open(prefix + "0", "rb").read())
    assert [entry["collective_seq_id"] for entry in trace["entries"]] == [1, 2]
    assert report in hook_output and "Traceback" in hook_output


NCCL_HANG_JOB = """
import time, torch, torch.distributed as dist
from osp_megatron.parallel.config import ParallelConfig
from osp_megatron.parallel.state import init_distributed
device = init_distributed(ParallelConfig(timeout_minutes=1))
dist.barrier()
dist.all_reduce(torch.ones(4, device=device))
torch.cuda.synchronize()
if dist.get_rank() == 1:
    time.sleep(600)  # never joins the next collective
dist.all_reduce(torch.ones(3, 5, device=device))
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_group_knows_its_device_and_a_hang_leaves_a_flight_recorder_dump(tmp_path):
    """Two NCCL ranks through init_distributed: no "device ... currently unknown" warning (the group is bound to
    its GPU); rank 1 skips an all-reduce, so after parallel.timeout_minutes rank 0's watchdog names the
    collective, the job ends instead of hanging, and rank 0's flight recorder is dumped where it was asked to be."""
    script = tmp_path / "job.py"
    script.write_text(NCCL_HANG_JOB)
    prefix = tmp_path / "recorder" / "rank_"
    prefix.parent.mkdir()
    env = dict(os.environ, **{FLIGHT_RECORDER_FILE: str(prefix)})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "currently unknown" not in log, log[-3000:]
    assert "Watchdog caught collective operation timeout" in log and "ALLREDUCE" in log, log[-3000:]
    dumps = sorted((tmp_path / "recorder").glob("rank_0*"))  # newer torch may add a suffix to the name
    assert dumps, log[-3000:]
    trace = pickle.loads(dumps[0].read_bytes())
    assert any(
        "all_reduce" in entry["profiling_name"] and entry["input_sizes"] == [[3, 5]] for entry in trace["entries"]
    ), trace["entries"]
