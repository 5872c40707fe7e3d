"""Mix-GRPO post-training: SDE sampling steps with log-probabilities, rollouts, rewards, learner, `osp-grpo`.

`osp_megatron.rl.sde_step` is the SDE step; `sde_log_prob` scores a recorded step for the learner.
"""

from osp_megatron.utils.lazy import lazy_exports

_EXPORTS = {
    "sde_step": "sde",
    "sde_log_prob": "sde",
    "ode_step": "sde",
    "GRPOJobConfig": "config",
    "load_grpo_config": "config",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
