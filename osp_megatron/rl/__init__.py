"""Mix-GRPO post-training: SDE sampling steps with log-probabilities, rollouts, rewards, learner, `osp-grpo`."""

from osp_megatron.rl.sde import ode_step, sde_log_prob, sde_step  # noqa: F401
