"""Console progress without a terminal (Slurm logs, pipes): one plain line every train.log_interval steps and at
the last step, with the numbers TensorBoard gets, and never a carriage return or an escape code."""

import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.engine.config import load_job_config
from osp_megatron.engine.metrics import MetricsLogger, duration


def test_plain_lines_every_interval_and_at_the_end(tmp_path, capsys):
    """Steps 4-12 of a resumed run with log_interval 5: lines at steps 5, 10 and 12 only."""
    logger = MetricsLogger(tmp_path, total_steps=12, start_step=3, enabled=True, progress=True, log_interval=5)
    for step in range(4, 13):
        logger.log(step, {"loss": 0.5 / step, "lr": 1e-3, "samples": 8, "note": "text is not a number"})
    logger.message("[osp-train] saved checkpoint step_12")
    logger.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["5/12", "10/12", "12/12"]
    assert lines[0].startswith("[train] step 5/12 (42%) elapsed ") and " eta " in lines[0]
    assert "loss=0.1 lr=0.001 samples=8" in lines[0] and "note=" not in lines[0]
    assert lines[3] == "[osp-train] saved checkpoint step_12"
    assert not any(char in out + err for char in "\r\x1b")


def test_other_ranks_and_progress_off_print_nothing(tmp_path, capsys):
    for enabled, progress in ((False, True), (True, False)):
        logger = MetricsLogger(
            tmp_path / str(enabled), total_steps=2, start_step=0, enabled=enabled, progress=progress, log_interval=1
        )
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 1.0})
        logger.close()
    assert capsys.readouterr() == ("", "")


def test_durations_read_as_hours_minutes_seconds():
    assert (duration(7.4), duration(65), duration(3725.2)) == ("7s", "1m05s", "1h02m05s")


def test_log_interval_must_be_positive():
    assert load_job_config("examples/tiny_t2v.yaml", ["train.log_interval=25"]).train.log_interval == 25
    with pytest.raises(ConfigError, match="train.log_interval must be >= 1, got 0"):
        load_job_config("examples/tiny_t2v.yaml", ["train.log_interval=0"])
