"""`python -m osp_launch.hang slurm_logs/<job id>`: which rank a hung job's other ranks waited for, read from the dumps
they wrote when their collective timed out (flight recorder and stacks, one pair per rank) and the tasks' notes.

A rank that wrote no dump never reached the timeout: it is stopped, hung outside a collective, or its node died.
A rank that dumped well after the others was not waiting with them: it was frozen, and ran (into its own expired
timeout) only when Slurm ended the step, which sends SIGCONT before SIGTERM. Otherwise each rank waited for the
members of its group that had not reached its collective; the rank that waited for nobody is where it began.
docs/cluster.md (Diagnosing a hang) walks through it.
"""

import argparse
import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .task import rank_ranges, read_notes

DUMP_NAME = re.compile(r"^rank_(\d+)$")
# Ranks waiting in collectives with a stuck rank fail within moments of each other (the first timeout, then
# "connection closed" as each one exits); a dump this much later than the first comes from a rank that was not
# waiting with them.
LATE_SECONDS = 5.0
RESTART_NAME = re.compile(r"^restart_(\d+)$")


@dataclass
class Collective:
    """One flight-recorder entry: the collective's sequence number in its group, what it was, who called it."""

    sequence: int
    operation: str
    group: str  # the group's description (default_pg, or megatron's name for it) and its id
    input_sizes: list
    called_from: str


@dataclass
class RankDump:
    rank: int
    host: str | None = None
    world_size: int | None = None
    error: str | None = None
    time: float | None = None  # when the rank wrote its dump (seconds since the epoch)
    collectives: list[Collective] = field(default_factory=list)  # oldest first

    @property
    def waiting_in(self) -> Collective | None:
        return self.collectives[-1] if self.collectives else None


def _caller(frames: list[dict]) -> str:
    """The innermost frame outside torch: the job's line that issued the collective."""
    for frame in frames or []:
        if "/torch/" not in frame.get("filename", ""):
            return f"{frame.get('filename')}:{frame.get('line')} ({frame.get('name')})"
    return "?"


def read_dump(path: Path) -> RankDump:
    """One rank's flight-recorder dump and, when present, the stack file beside it."""
    rank = int(DUMP_NAME.match(path.name).group(1))
    try:
        trace = pickle.loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a flight-recorder dump: {error}") from None
    entries = sorted(trace.get("entries", []), key=lambda entry: entry.get("record_id", 0))
    collectives = []
    for entry in entries:
        # Every rank creates every group in the same order, so a group's id is the same on all its members, and
        # groups of one kind (the tensor group of each node) differ by id.
        number, description = entry.get("process_group") or ("?", "?")
        collectives.append(
            Collective(
                int(entry.get("collective_seq_id", 0)),
                str(entry.get("profiling_name")),
                f"{description or 'default'} (id {number})",
                entry.get("input_sizes"),
                _caller(entry.get("frames")),
            )
        )
    dump = RankDump(rank, collectives=collectives)
    stack = path.with_name(f"stack_{path.name}.json")
    if stack.is_file():
        where = json.loads(stack.read_text())
        dump.host, dump.world_size, dump.error, dump.time = (
            where.get("host"),
            where.get("world_size"),
            where.get("error"),
            where.get("time"),
        )
    return dump


def locate(folder: Path, restart: int | None = None) -> tuple[Path, Path | None, int | None]:
    """(dump folder, job folder or None, restart) for a job folder (its newest run unless `restart`), one run's
    dump folder inside it, or any folder of rank_<N> dumps."""
    folder = Path(folder)
    if (folder / "flight_recorder").is_dir():
        runs = {
            int(RESTART_NAME.match(p.name).group(1)): p
            for p in (folder / "flight_recorder").iterdir()
            if RESTART_NAME.match(p.name)
        }
        if restart is None and runs:
            restart = max(runs)
        if restart not in runs:
            raise ValueError(
                f"{folder / 'flight_recorder'} holds no dumps of restart {restart}"
                + (f" (runs: {', '.join(map(str, sorted(runs)))})" if runs else "")
            )
        return runs[restart], folder, restart
    match = RESTART_NAME.match(folder.name)
    if match and folder.parent.name == "flight_recorder":
        return folder, folder.parent.parent, int(match.group(1))
    return folder, None, None


def diagnose(folder: Path, restart: int | None = None) -> str:
    """The report: every rank's host and the collective it waited in, then the rank(s) the others waited for."""
    dump_folder, job_folder, restart = locate(folder, restart)
    dumps = {
        dump.rank: dump for dump in map(read_dump, sorted(p for p in dump_folder.iterdir() if DUMP_NAME.match(p.name)))
    }
    started = read_notes(job_folder, "started", restart) if job_folder is not None else {}
    ended = read_notes(job_folder, "ended", restart) if job_folder is not None else {}
    if not dumps:
        raise ValueError(
            f"no rank_<N> flight-recorder dumps in {dump_folder}: no rank reached a collective "
            "timeout (see the ranks' .err logs)"
        )
    sizes = [dump.world_size for dump in dumps.values() if dump.world_size] + [len(started)]
    world = max(sizes + [max(dumps) + 1])
    hosts = {rank: note.get("host") for rank, note in started.items()}
    hosts.update({rank: dump.host for rank, dump in dumps.items() if dump.host})

    times = {rank: dump.time for rank, dump in dumps.items() if dump.time is not None}
    first = min(times.values(), default=0.0)
    lines = [f"{world} ranks; dumps from {len(dumps)}" + (f" (restart {restart})" if restart is not None else "")]
    for rank in range(world):
        dump = dumps.get(rank)
        after = f" (dumped {times[rank] - first:.1f} s after the first)" if rank in times else ""
        where = f"rank {rank} on {hosts.get(rank) or '?'}{after}: "
        if dump is None:
            note = ended.get(rank)
            lines.append(where + "no dump" + (f"; its job exited with status {note['returncode']}" if note else ""))
        elif dump.waiting_in is None:
            lines.append(where + "dumped, but had entered no collective")
        else:
            last = dump.waiting_in
            lines.append(
                where + f"waiting in #{last.sequence} {last.operation} on group {last.group} (input "
                f"sizes {last.input_sizes}), called from {last.called_from}"
            )

    silent = [rank for rank in range(world) if rank not in dumps]
    if silent:
        crashed = [rank for rank in silent if ended.get(rank, {}).get("returncode", 0) != 0]
        lines.append(
            f"=> the others waited for rank(s) {rank_ranges(silent)} on "
            f"{', '.join(sorted({hosts.get(rank) or '?' for rank in silent}))}: "
            + (
                "they exited with an error (their .err log has the traceback)"
                if crashed == silent
                else "they never reached the timeout, so they were stopped, hung outside a collective, or their "
                "node died (py-spy dump --pid <pid> on that host shows a live rank's stack)"
            )
        )
        return "\n".join(lines)
    late = sorted(rank for rank, moment in times.items() if moment > first + LATE_SECONDS)
    if late:
        lines.append(
            f"=> the others waited for rank(s) {rank_ranges(late)} on "
            f"{', '.join(sorted({hosts.get(rank) or '?' for rank in late}))}: it dumped long after they "
            "failed, so it was not waiting with them: it was stopped or stuck, and ran again only when the "
            "job was ended"
        )
        return "\n".join(lines)
    waits = waiting_for(dumps)
    held_up = sorted({rank for ranks in waits.values() for rank in ranks})
    roots = [rank for rank in held_up if not waits.get(rank)]
    if roots:
        lines.append(
            f"=> the others waited for rank(s) {rank_ranges(roots)} on "
            f"{', '.join(sorted({hosts.get(rank) or '?' for rank in roots}))}: behind on the group it waits "
            "in, it reached the collective the others were in last, or never (stopped, slow, or hung "
            "outside collectives before it was ended)"
        )
    else:
        lines.append(
            "=> every rank dumped and all wait in the same collectives: a desync (ranks called different "
            "collectives) or a network fault; rerun small with TORCH_DISTRIBUTED_DEBUG=DETAIL"
        )
    return "\n".join(lines)


def waiting_for(dumps: dict[int, RankDump]) -> dict[int, list[int]]:
    """Rank -> the ranks it waited for: the members of the group of its newest collective whose own newest
    collective on that group is an earlier one (they had not reached it)."""
    newest: dict[str, dict[int, int]] = {}
    for dump in dumps.values():
        for collective in dump.collectives:
            per_rank = newest.setdefault(collective.group, {})
            per_rank[dump.rank] = max(per_rank.get(dump.rank, 0), collective.sequence)
    waits = {}
    for dump in dumps.values():
        last = dump.waiting_in
        if last is not None:
            waits[dump.rank] = sorted(rank for rank, sequence in newest[last.group].items() if sequence < last.sequence)
    return waits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osp_launch.hang",
        description="Name the rank a hung job waited for, from the flight-recorder "
        "dumps and stacks its ranks wrote at the collective timeout (docs/cluster.md, Diagnosing a hang).",
    )
    parser.add_argument(
        "folder",
        type=Path,
        help="the job's log folder (slurm_logs/<job id>), one run's "
        "flight_recorder/restart_<N> folder in it, or any folder of rank_<N> dumps",
    )
    parser.add_argument("--restart", type=int, help="which run of a requeued job (default: the newest with dumps)")
    args = parser.parse_args(argv)
    try:
        print(diagnose(args.folder, args.restart))
    except (OSError, ValueError) as error:
        print(f"osp_launch.hang: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
