"""Every job refuses, with exit status 2 and the dotted key, a setting it would ignore; a setting it honours at
its default passes; --help and --print-config list only the keys the job honours."""

import pytest
import yaml

from osp_megatron.inference.cli import main as sample_main
from osp_megatron.rl.cli import main as grpo_main
from osp_megatron.training.cli import main as train_main


@pytest.mark.parametrize(
    "job, override",
    [
        (train_main, "sample.frames=true"),
        (train_main, "sample.cfg_parallel=true"),
        (grpo_main, "train.text_dropout=0.1"),
        (grpo_main, "train.timestep_shift=3"),
        (grpo_main, "train.logit_mean=1"),
        (grpo_main, "data.path=elsewhere"),
        (grpo_main, "train.eval_interval=5"),
    ],
)
def test_training_jobs_refuse_settings_they_ignore(job, override, capsys):
    assert job([override]) == 2
    key = override.split("=")[0]
    assert f"error: {key}: " in capsys.readouterr().err


@pytest.mark.parametrize("override", ["grpo.lora.rank=8"])
def test_a_moved_key_says_where_it_went(override, capsys):
    assert grpo_main([override]) == 2
    assert "grpo.lora' has moved to lora" in capsys.readouterr().err


def test_honoured_settings_at_any_value_and_ignored_ones_at_their_default_pass(capsys):
    """osp-grpo honours the EMA placement, asynchronous saves, FSDP, quantization and LoRA (settings it
    used to accept and ignore or refuse); an ignored key given its default value is accepted."""
    assert (
        grpo_main(
            [
                "--print-config",
                "train.ema_device=cpu",
                "checkpoint.async_save=true",
                "parallel.fsdp=true",
                "quant.recipe=hif8",
                "lora.rank=8",
                "train.text_dropout=0.0",
            ]
        )
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["ema_device"] == "cpu" and printed["lora"]["rank"] == 8
    assert printed["quant"]["recipe"] == "hif8" and printed["parallel"]["fsdp"] is True
    # --print-config shows what the job reads: no training-set or loss-shape keys for osp-grpo.
    assert "text_dropout" not in printed["train"] and set(printed["data"]) == {"synthetic_seed"}


def test_help_lists_only_the_keys_a_job_honours(capsys):
    with pytest.raises(SystemExit):
        grpo_main(["--help"])
    grpo_help = capsys.readouterr().out
    assert "timestep_shift" not in grpo_help and "text_dropout" not in grpo_help
    assert "ema_device" in grpo_help and "async_save" in grpo_help and "lora:" in grpo_help
    with pytest.raises(SystemExit):
        train_main(["--help"])
    train_help = capsys.readouterr().out
    assert "timestep_shift" in train_help and "lora:" in train_help and "cfg_parallel" not in train_help


def test_osp_sample_refuses_training_settings(tiny_checkpoint, capsys, tmp_path):
    """Settings from the command line or a config file that sampling does not read are refused; the training
    settings stored in the checkpoint itself are dropped, not refused."""
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle", "--output", str(tmp_path / "a.mp4")]
    for override in ("train.lr=0.5", "parallel.fsdp=true", "lora.rank=4", "data.path=x"):
        assert sample_main([*args, override]) == 2, override
        assert f"error: {override.split('=')[0]}: osp-sample does not use this setting" in capsys.readouterr().err
    config_file = tmp_path / "extra.yaml"
    config_file.write_text(yaml.safe_dump({"checkpoint": {"interval": 5}}))
    assert sample_main([*args, "--config", str(config_file)]) == 2
    assert "checkpoint.interval: osp-sample does not use" in capsys.readouterr().err


def test_osp_eval_names_itself_when_refusing(tiny_checkpoint):
    from osp_megatron.config.errors import ConfigError
    from osp_megatron.inference.loading import resolve_weights, sampling_config

    weights = resolve_weights(str(tiny_checkpoint))
    with pytest.raises(ConfigError, match="train.steps: osp-eval does not use this setting"):
        sampling_config(weights, None, ["train.steps=3"], job="osp-eval")
    assert (
        sampling_config(weights, None, ["quant.recipe=hif8", "parallel.ssp=1"], job="osp-eval").quant.recipe == "hif8"
    )
