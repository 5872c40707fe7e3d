"""Training telemetry: one JSON line per step, TensorBoard scalars, and a console progress bar with ETA.

Only the logging rank writes; other ranks get a no-op logger.
"""

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
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
            self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                                 samples_s=f"{scalars.get('samples_per_s', 0):.1f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
