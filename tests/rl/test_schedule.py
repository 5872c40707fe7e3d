"""The Mix-GRPO window: sliding with shift interval and stride, wrap-around, fixed, offset; rollout plans with flash."""

import pytest

from osp_megatron.config.errors import ConfigError
from osp_megatron.inference.sampler import flow_timesteps
from osp_megatron.rl.schedule import rollout_plan, window_start


def test_sliding_window_moves_every_interval_and_wraps():
    starts = [window_start(i, num_steps=6, window_size=3, shift_interval=2) for i in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]  # last start 6 - 3 = 3, then back to 0


def test_stride_and_fixed_window():
    assert [window_start(i, 10, 4, stride=3) for i in range(4)] == [0, 3, 6, 0]
    assert {window_start(i, 25, 10, mode="fixed") for i in range(30)} == {0}  # OSP-Next: 10 of 25 at the start
    assert [window_start(i, 5, 5) for i in range(3)] == [0, 0, 0]  # the window covers every step
    with pytest.raises(ConfigError, match="window_size"):
        window_start(0, 5, 6)


def test_window_offset_moves_the_first_position():
    """A fixed window stays at the offset; a sliding one slides from it to the end and wraps back to it."""
    assert {window_start(i, 10, 2, mode="fixed", offset=4) for i in range(5)} == {4}
    assert [window_start(i, 10, 2, stride=3, offset=2) for i in range(4)] == [2, 5, 8, 2]
    assert [window_start(i, 10, 2, offset=8) for i in range(2)] == [8, 8]  # the last position: nowhere to slide
    with pytest.raises(ConfigError, match="grpo.window_offset"):
        window_start(0, 10, 4, offset=7)


def test_plan_kinds_and_grid():
    """ODE before the window, SDE inside, ODE after on the same grid; NFE = steps."""
    plan = rollout_plan(8, shift=3.0, start=2, window_size=3)
    assert plan.kinds == ("ode",) * 2 + ("sde",) * 3 + ("ode",) * 3
    assert plan.sde_steps == [2, 3, 4] and plan.model_evaluations == 8
    assert plan.sigmas.tolist() == flow_timesteps(8, 3.0).tolist()


def test_flash_plan_is_coarser_after_the_window_and_ends_at_zero():
    grid = flow_timesteps(25, 3.0)
    plan = rollout_plan(25, shift=3.0, start=4, window_size=4, flash=True, flash_stride=2)
    assert plan.kinds[:8] == ("ode",) * 4 + ("sde",) * 4
    assert set(plan.kinds[8:]) == {"flash"} and len(plan.kinds) == 8 + 9  # 17 grid intervals -> 9 coarse steps
    assert plan.sigmas[:9].tolist() == grid[:9].tolist()
    assert plan.sigmas[-1] == 0 and (plan.sigmas[1:] < plan.sigmas[:-1]).all()
    assert set(plan.sigmas.tolist()) <= set(grid.tolist())
