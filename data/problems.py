"""Bad inputs of a data job: each reported once as it is met, counted by kind, and summarised at the end.

Nothing bad stops a job or disappears: every skipped item is in the summary and the job's report JSON.
"""

import sys

from tqdm import tqdm

# Past this many of one kind, further items are only counted (and listed in the report file).
PRINTED_PER_KIND = 50


class ProblemLog:
    """Collects (kind, item, message) records; `report()` warns, `summary()` and `as_dict()` summarise."""

    def __init__(self, job: str):
        self.job = job
        self.records = []
        self.printed = {}

    def report(self, kind: str, item: object, message: str) -> None:
        """Record one skipped item and print it (the first PRINTED_PER_KIND of its kind)."""
        self.records.append({"kind": kind, "item": str(item), "message": message})
        printed = self.printed.get(kind, 0)
        self.printed[kind] = printed + 1
        if printed < PRINTED_PER_KIND:
            tqdm.write(f"osp-data {self.job}: warning: skipping {item}: {kind}: {message}", file=sys.stderr)
        elif printed == PRINTED_PER_KIND:
            tqdm.write(
                f"osp-data {self.job}: warning: more '{kind}' problems; only counting them now (all are "
                "listed in the report file)",
                file=sys.stderr,
            )

    def extend(self, records: list[dict]) -> None:
        """Add records met earlier (a resumed job's, or another process's) without printing them again."""
        self.records.extend(records)

    def counts(self) -> dict[str, int]:
        counts = {}
        for record in self.records:
            counts[record["kind"]] = counts.get(record["kind"], 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        counts = self.counts()
        if not counts:
            return "no bad input"
        return f"skipped {len(self.records)} bad input(s): " + ", ".join(f"{n} {kind}" for kind, n in counts.items())

    def as_dict(self) -> dict:
        return {"counts": self.counts(), "items": list(self.records)}
