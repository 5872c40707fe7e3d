"""`osp-grpo`: Mix-GRPO post-training of the DiT from a YAML config plus dotted overrides.

Example: osp-grpo --config examples/grpo_tiny.yaml train.steps=8 run.dir=runs/try
"""

import dataclasses
import sys

from osp_megatron.engine.cli import SAMPLE_RUN_ONLY, JobSpec, job_main

DESCRIPTION = (
    "Post-train a text-to-video DiT with Mix-GRPO: grouped rollouts whose sliding window of SDE steps "
    "is trained against rewards. Launch under torchrun or srun for several ranks."
)
EXAMPLES = """\
main sections:
  grpo       group_size, prompts_per_iteration, num_steps, eta, window_size, window_mode (sliding|fixed),
             window_shift_interval, window_stride, window_offset, flash, flash_stride, clip_range, kl_coef,
             advantage_clip, updates_per_iteration, shuffle_rewards (the control of a study: rewards
             shuffled over the samples before the advantages), rewards [{name, weight, ...}], eval_interval,
             eval_prompts, decode_batch_size, pretrain_if_missing, reward_ranks (the last N ranks run the
             reward models)
  lora       rank, alpha, target_modules (null: full fine-tuning; the base is checkpoint.load)
  prompts    path (text file, .jsonl, or webdataset shards with text.npy + txt), format, jsonl_key,
             prompts (inline list), synthetic (the synthetic data set's captions)
  sample     rollout video size (num_frames, height, width), shift, guidance_scale, negative_prompt
  train      steps (= iterations), lr, warmup_steps, grad_clip, micro_batch_size (samples per forward),
             seed, precision, device, ema_decay, ema_device
  checkpoint load (initial weights: run folder, checkpoint, diffusers or Wan2.1), resume (auto|none|PATH),
             interval, keep_last, async_save
  parallel   as in osp-train; fsdp=true shards the policy (and its reference) over data x ssp x ulysses
  quant      as in osp-train: quantized rollouts and learner
  run, model as in osp-train; data: only synthetic_seed (the tiny encoders' seed)

examples:
  osp-grpo                                                   # the tiny CPU example (examples/grpo_tiny.yaml)
  osp-grpo --config examples/grpo_tiny.yaml lora.rank=8 run.dir=runs/grpo_lora
  osp-grpo --config examples/grpo_tiny.yaml grpo.flash=true grpo.window_mode=fixed
  osp-grpo --print-config --config examples/grpo_wan1.3b.yaml
  torchrun --nproc_per_node 8 -m osp_megatron.rl.cli --config examples/grpo_wan1.3b.yaml
  torchrun --nproc_per_node 8 -m osp_megatron.rl.cli --config examples/grpo_wan1.3b.yaml grpo.reward_ranks=1

Outputs go to run.dir: metrics.jsonl (one line per iteration: reward per reward, advantages, policy
ratio, clip fraction, KL, NFE per sample, rollout and learner seconds, eval_reward on fixed prompts),
tensorboard/, checkpoints/ (resumed
automatically; Ctrl-C, SIGTERM or SIGUSR1 checkpoint and exit 0), merged/ (LoRA folded into the weights),
samples/.
"""


def build_trainer(config):
    """The GRPO trainer, or on the last grpo.reward_ranks ranks the reward server that scores its videos."""
    from osp_megatron.engine.distributed import start_process_groups
    from osp_megatron.parallel import state
    from osp_megatron.rl.trainer import GRPOTrainer

    if config.grpo.reward_ranks:
        start_process_groups(config, reserved_ranks=config.grpo.reward_ranks)
        if state.world_split().is_reserved:
            from osp_megatron.rl.reward_ranks import RewardServer

            return RewardServer(config)
    return GRPOTrainer(config)


def summary(result: dict) -> str:
    """The end of the run in one line: the evaluation reward when there is one, and the last rollouts'."""
    rollouts = f"mean rollout reward {result['reward']:.4f}"
    if "eval_reward" in result:
        return f"evaluation reward {result['eval_reward']:.4f}; {rollouts}"
    return rollouts


def grpo_spec() -> JobSpec:
    """osp-grpo's settings: the pretraining job's, less the data set and the flow-matching loss (rollouts come
    from prompts, the loss from rewards) and the sampling-run-only keys."""
    from osp_megatron.data.config import DataConfig
    from osp_megatron.rl.config import GRPOJobConfig

    # data.synthetic_seed seeds the tiny text encoder and VAE the policy was trained with; the rest of `data`
    # describes a training set.
    data = tuple(f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name != "synthetic_seed")
    loss = (
        "train.timestep_shift",
        "train.logit_mean",
        "train.logit_std",
        "train.text_dropout",
        "train.eval_interval",
        "train.eval_samples",
        "train.peak_tflops",
    )
    return JobSpec(
        "osp-grpo",
        GRPOJobConfig,
        DESCRIPTION,
        EXAMPLES,
        "grpo_tiny.yaml",
        ignored=data + loss + SAMPLE_RUN_ONLY,
        build=build_trainer,
        summary=summary,
    )


def main(argv=None) -> int:
    return job_main(grpo_spec(), argv)


if __name__ == "__main__":
    sys.exit(main())
