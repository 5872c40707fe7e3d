"""The hang report (python -m osp_launch.hang): from the dumps the surviving ranks wrote at the collective timeout and
the tasks' notes, it names each rank's host and collective, and the rank(s) the others waited for."""

import json
import pickle

import pytest

from osp_launch.hang import diagnose, main
from osp_launch.task import write_note


def _entry(record, sequence, group=("0", "default_pg"), caller="trainer.py"):
    return {
        "record_id": record,
        "collective_seq_id": sequence,
        "profiling_name": "gloo:all_reduce",
        "process_group": group,
        "input_sizes": [[4]],
        "state": "scheduled",
        "frames": [
            {"name": "all_reduce", "filename": "/venv/torch/distributed/distributed_c10d.py", "line": 1},
            {"name": "train_step", "filename": f"/src/{caller}", "line": 42},
        ],
    }


def _dump(folder, rank, sequences, world=4, host="osp-node1", groups=None, extra=(), moment=None):
    """Rank `rank`'s flight-recorder dump (one all_reduce per sequence number, then `extra` entries) and its stack
    file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = groups or {"0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}}
    entries = [_entry(index, sequence) for index, sequence in enumerate(sequences)] + list(extra)
    (folder / f"rank_{rank}").write_bytes(pickle.dumps({"version": "2.10", "pg_config": config, "entries": entries}))
    (folder / f"stack_rank_{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": world,
                "host": host,
                "error": "RuntimeError: Timed out waiting 30000ms",
                "time": moment,
            }
        )
    )


@pytest.fixture
def job(tmp_path):
    """A two-node job folder: ranks 0-1 on osp-node1, 2-3 on osp-node2, all started in restart 1."""
    folder = tmp_path / "4242"
    for rank in range(4):
        write_note(folder, "started", 1, rank, host=f"osp-node{rank // 2 + 1}", local_rank=rank % 2, pid=100 + rank)
    return folder


def test_the_rank_without_a_dump_is_the_one_waited_for(job, capsys):
    """Rank 3 was stopped: ranks 0-2 dumped, waiting in all_reduce #7; the report names rank 3 and its host."""
    for rank in range(3):
        _dump(job / "flight_recorder" / "restart_1", rank, [5, 6, 7], host=f"osp-node{rank // 2 + 1}")
    _dump(job / "flight_recorder" / "restart_0", 0, [1])  # an earlier run of the job: not this hang
    report = diagnose(job)
    assert report.splitlines()[0] == "4 ranks; dumps from 3 (restart 1)"
    assert (
        "rank 2 on osp-node2: waiting in #7 gloo:all_reduce on group default_pg (id 0) (input sizes [[4]]), "
        "called from /src/trainer.py:42 (train_step)"
    ) in report
    assert "rank 3 on osp-node2: no dump" in report
    assert report.splitlines()[-1].startswith("=> the others waited for rank(s) 3 on osp-node2: they never reached")
    assert main([str(job / "flight_recorder" / "restart_1")]) == 0
    assert capsys.readouterr().out.strip() == report


def test_a_lost_node_and_a_crashed_rank(job):
    """Both ranks of osp-node2 missing (the node died); a missing rank whose job exited non-zero crashed."""
    for rank in range(2):
        _dump(job / "flight_recorder" / "restart_1", rank, [3])
    assert "=> the others waited for rank(s) 2-3 on osp-node2: they never reached" in diagnose(job)
    for rank in (2, 3):
        write_note(job, "ended", 1, rank, returncode=1, signals=[], host="osp-node2")
    report = diagnose(job)
    assert "rank 2 on osp-node2: no dump; its job exited with status 1" in report
    assert "they exited with an error" in report


def test_every_rank_dumped_the_one_that_waited_for_nobody_is_named(tmp_path):
    """What a two-node FSDP x tensor job leaves when rank 3 was stopped and later resumed and ended by Slurm (so it
    dumped too; no notes: a bare dump folder): ranks 0-1 wait in the data-parallel all_gather #46 for ranks 2-3,
    rank 2 waits in its node's tensor all_reduce #202 for rank 3, and rank 3, at #201 there, waited for nobody."""
    folder = tmp_path / "dumps"
    tensor = {0: ("15", 202), 1: ("15", 202), 2: ("16", 202), 3: ("16", 201)}
    data = {0: ("1", 46), 1: ("3", 46), 2: ("1", 45), 3: ("3", 45)}
    for rank in range(4):
        data_after_tensor = rank < 2  # ranks 0-1 finished the tensor all_reduce and went on
        entries = [
            _entry(2 if data_after_tensor else 1, data[rank][1], group=(data[rank][0], "DATA_PARALLEL_GROUP_WITH_CP")),
            _entry(
                1 if data_after_tensor else 2, tensor[rank][1], group=(tensor[rank][0], "TENSOR_MODEL_PARALLEL_GROUP")
            ),
        ]
        _dump(folder, rank, [], groups={}, extra=entries, host=f"osp-node{rank // 2 + 1}")
    report = diagnose(folder)
    assert "rank 0 on osp-node1: waiting in #46 gloo:all_reduce on group DATA_PARALLEL_GROUP_WITH_CP (id 1)" in report
    assert "rank 3 on osp-node2: waiting in #201 gloo:all_reduce on group TENSOR_MODEL_PARALLEL_GROUP (id 16)" in report
    assert report.splitlines()[-1].startswith("=> the others waited for rank(s) 3 on osp-node2: behind on the group")


def test_a_rank_that_dumped_long_after_the_others_is_named(tmp_path):
    """Rank 1 was frozen inside the all_reduce the others waited in (same sequence number everywhere) and dumped
    only 21 s after them, when Slurm resumed it to end the step."""
    folder = tmp_path / "dumps"
    for rank, moment in enumerate((1000.0, 1021.0, 1000.4, 1000.2)):
        _dump(folder, rank, [51], moment=moment, host=f"osp-node{rank % 2 + 1}")
    report = diagnose(folder)
    assert "rank 1 on osp-node2 (dumped 21.0 s after the first): waiting in #51" in report
    assert report.splitlines()[-1].startswith("=> the others waited for rank(s) 1 on osp-node2: it dumped long after")


def test_missing_or_foreign_dumps_are_named(tmp_path, job, capsys):
    with pytest.raises(ValueError, match="holds no dumps of restart 0"):
        _dump(job / "flight_recorder" / "restart_1", 0, [1])
        diagnose(job, restart=0)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no rank_<N> flight-recorder dumps in" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rank_0").write_text("not a dump")
    with pytest.raises(ValueError, match="is not a flight-recorder dump"):
        diagnose(tmp_path / "bad")
