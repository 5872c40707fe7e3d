"""Training telemetry: one JSON line per step, TensorBoard scalars and images, and console progress: a bar with
ETA on a terminal, else one plain line every train.log_interval steps (logs under Slurm; docs/cluster.md).

Only the logging rank writes; other ranks get a no-op logger. A resumed run first trims what the killed run
logged after its checkpoint, so every step appears exactly once.
"""

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def trim_metrics(path: str | Path, last_step: int) -> int:
    """Drop records of steps after `last_step` (and a half-written last line) from a metrics.jsonl.

    Returns how many lines were dropped; the file is rewritten atomically only when something changes.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def duration(seconds: float) -> str:
    """3725.2 -> '1h02m05s', 65 -> '1m05s', 7.4 -> '7s'."""
    minutes, whole = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{whole:02d}s" if hours else f"{minutes}m{whole:02d}s" if minutes else f"{whole}s"


def progress_line(desc: str, step: int, total_steps: int, scalars: dict, elapsed: float, eta: float) -> str:
    """One line of plain text with the step and every number TensorBoard gets for it (no carriage returns)."""
    numbers = " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in scalars.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    return (
        f"[{desc}] step {step}/{total_steps} ({100 * step / total_steps:.0f}%) elapsed {duration(elapsed)} "
        f"eta {duration(eta)} {numbers}"
    ).rstrip()


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool,
        desc: str = "train",
        progress_keys: tuple = ("loss", "samples_per_s"),
        log_interval: int = 10,
    ):
        self.enabled = enabled
        self.progress_keys = progress_keys  # the scalars the progress bar shows
        self.bar = None
        # Without a terminal (Slurm, a pipe, a file) a bar's redraws would fill the log with carriage returns.
        self.plain_lines = progress and not (sys.stdout.isatty() and sys.stderr.isatty())
        self.desc, self.total_steps, self.start_step, self.log_interval = desc, total_steps, start_step, log_interval
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A run killed after its last checkpoint logged steps that the resumed run repeats.
        self.trimmed = trim_metrics(run_dir / METRICS_FILE, start_step)
        self.jsonl = open(run_dir / METRICS_FILE, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard discard the earlier event files' records of steps > start_step.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress and not self.plain_lines:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        self.started = time.time()

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            if isinstance(value, (int, float)):
                # Keys that carry their own section (e.g. the ledger's comm/<group>/<op>_bytes) keep it.
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.bar is not None:
            shown = {key: scalars[key] for key in self.progress_keys if key in scalars}
            self.bar.set_postfix(
                {key.replace("_per_", "/"): f"{value:.4g}" for key, value in shown.items()}, refresh=False
            )
            self.bar.update(step - self.bar.n)
        elif self.plain_lines and (step % self.log_interval == 0 or step == self.total_steps):
            elapsed = time.time() - self.started
            eta = elapsed / max(step - self.start_step, 1) * (self.total_steps - step)
            print(progress_line(self.desc, step, self.total_steps, scalars, elapsed, eta), flush=True)

    def log_image(self, tag: str, image, step: int) -> None:
        """An HWC uint8 image (e.g. a sample's frame strip) under `tag` in TensorBoard."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
