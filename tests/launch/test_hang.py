"""The hang report (python -m launch.hang): from the dumps the surviving ranks wrote at the collective timeout and
the tasks' notes, it names each rank's host and collective, and the rank(s) the others waited for."""

import json
import pickle

import pytest

from launch.hang import diagnose, main
from launch.task import write_note


def _entry(record, sequence, group=("0", "default_pg"), caller="trainer.py"):
    return {"record_id": record, "collective_seq_id": sequence, "profiling_name": "gloo:all_reduce",
            "process_group": group, "input_sizes": [[4]], "state": "scheduled",
            "frames": [{"name": "all_reduce", "filename": "/venv/torch/distributed/distributed_c10d.py", "line": 1},
                       {"name": "train_step", "filename": f"/src/{caller}", "line": 42}]}


def _dump(folder, rank, sequences, world=4, host="osp-node1", groups=None, extra=()):
    """Rank `rank`'s flight-recorder dump (one all_reduce per sequence number, then `extra` entries) and its stack
    file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = groups or {"0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}}
    entries = [_entry(index, sequence) for index, sequence in enumerate(sequences)] + list(extra)
    (folder / f"rank_{rank}").write_bytes(pickle.dumps({"version": "2.10", "pg_config": config, "entries": entries}))
    (folder / f"stack_rank_{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "host": host, "error": "RuntimeError: Timed out waiting 30000ms"}))


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
    assert ("rank 2 on osp-node2: waiting in #7 gloo:all_reduce on group default_pg [0, 1, 2, 3] (input sizes "
            "[[4]]), called from /src/trainer.py:42 (train_step)") in report
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


def test_every_rank_dumped_the_one_behind_is_named(tmp_path):
    """All four dumped (no notes: a bare dump folder); rank 1 is at #6 of the group while the others wait in #7.
    Tensor groups of both nodes share a name but not their members, and are not compared with each other."""
    folder = tmp_path / "dumps"
    for rank, sequences in enumerate(([7], [6], [7], [7])):
        node_pair = str([rank // 2 * 2, rank // 2 * 2 + 1])
        groups = {"0": {"desc": "default_pg", "ranks": "[0, 1, 2, 3]"}, "1": {"desc": "tensor", "ranks": node_pair}}
        # The tensor group of osp-node1 is far ahead of osp-node2's: normal, they are different groups.
        tensor_sequence = 90 if rank < 2 else 30
        _dump(folder, rank, sequences, groups=groups, extra=[_entry(9, tensor_sequence, group=("1", "tensor"))])
    report = diagnose(folder)
    assert "rank 0 on osp-node1: waiting in #90 gloo:all_reduce on group tensor [0, 1]" in report
    assert report.splitlines()[-1] == ("=> on group default_pg [0, 1, 2, 3], rank(s) 1 are behind the others' "
                                       "newest collective and held them up")


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
