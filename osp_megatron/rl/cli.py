"""`osp-grpo`: Mix-GRPO post-training of the DiT from a YAML config plus dotted overrides.

Example: osp-grpo --config examples/grpo_tiny.yaml train.steps=20 run.dir=runs/try
"""

import sys


DESCRIPTION = ("Post-train a text-to-video DiT with Mix-GRPO: grouped rollouts whose sliding window of SDE steps "
               "is trained against rewards. Launch under torchrun or srun for several ranks.")
EXAMPLES = """\
main sections:
  grpo       group_size, prompts_per_iteration, num_steps, eta, window_size, window_mode (sliding|fixed),
             window_shift_interval, window_stride, flash, flash_stride, clip_range, kl_coef,
             advantage_clip, updates_per_iteration, rewards [{name, weight, ...}], lora {rank, alpha,
             target_modules} (null: full fine-tuning), eval_interval, eval_prompts, decode_batch_size,
             pretrain_if_missing, reward_ranks (the last N ranks run the reward models)
  prompts    path (text file, .jsonl, or webdataset shards with text.npy + txt), format, jsonl_key,
             prompts (inline list), synthetic (the synthetic data set's captions)
  sample     rollout video size (num_frames, height, width), shift, guidance_scale, negative_prompt
  train      steps (= iterations), lr, warmup_steps, grad_clip, micro_batch_size (samples per forward),
             seed, precision, device
  checkpoint load (initial weights: run folder, checkpoint, diffusers or Wan2.1), resume (auto|none|PATH),
             interval, keep_last
  run, parallel, model, data as in osp-train

examples:
  osp-grpo                                                   # the tiny CPU example (examples/grpo_tiny.yaml)
  osp-grpo --config examples/grpo_tiny.yaml grpo.lora.rank=8 run.dir=runs/grpo_lora
  osp-grpo --config examples/grpo_tiny.yaml grpo.flash=true grpo.window_mode=fixed
  osp-grpo --print-config --config examples/grpo_wan1.3b.yaml
  torchrun --nproc_per_node 8 -m osp_megatron.rl.cli --config examples/grpo_wan1.3b.yaml
  torchrun --nproc_per_node 8 -m osp_megatron.rl.cli --config examples/grpo_wan1.3b.yaml grpo.reward_ranks=1

Outputs go to run.dir: metrics.jsonl (one line per iteration: reward per reward, advantages, policy
ratio, clip fraction, KL, NFE per sample, rollout and learner seconds, eval_reward on fixed prompts), tensorboard/, checkpoints/ (resumed
automatically; Ctrl-C, SIGTERM or SIGUSR1 checkpoint and exit 0), merged/ (LoRA folded into the weights),
samples/.
"""


def build_trainer(config):
    """The GRPO trainer, or on the last grpo.reward_ranks ranks the reward server that scores its videos."""
    from osp_megatron.parallel import state
    from osp_megatron.rl.trainer import GRPOTrainer
    from osp_megatron.training.trainer import start_process_groups

    if config.grpo.reward_ranks:
        start_process_groups(config, reserved_ranks=config.grpo.reward_ranks)
        if state.world_split().is_reserved:
            from osp_megatron.rl.reward_ranks import RewardServer

            return RewardServer(config)
    return GRPOTrainer(config)


def main(argv=None) -> int:
    from osp_megatron.rl.config import GRPOJobConfig, load_grpo_config
    from osp_megatron.training.cli import build_parser, job_main, packaged_config

    parser = build_parser("osp-grpo", DESCRIPTION, EXAMPLES, GRPOJobConfig, "examples/grpo_tiny.yaml")
    return job_main(argv, parser, load_grpo_config, packaged_config("grpo_tiny.yaml"), "osp-grpo", build_trainer,
                    summary=lambda result: f"mean reward {result['reward']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
