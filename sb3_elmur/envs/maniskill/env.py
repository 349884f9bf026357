"""One ManiSkill task: ``gym.make`` of it with MIKASA-Robo's wrappers, and one CPU-simulated task as a plain
gymnasium env in SB3's layouts (what each worker of the CPU backend holds)."""

from collections.abc import Sequence
from typing import Any, Dict, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch as th

from sb3_elmur.envs.maniskill.mikasa import _wrap_mikasa
from sb3_elmur.envs.maniskill.observations import (
    TorchObs,
    _check_observation_settings,
    _flags,
    _rows,
    _to_numpy,
    convert_observation,
    observation_space,
)
from sb3_elmur.envs.maniskill.tasks import check_task


def make_maniskill_env(
    env_id: str,
    num_envs: int,
    sim_backend: str,
    obs_mode: str,
    image_size: Optional[int] = None,
    env_kwargs: Optional[Dict[str, Any]] = None,
    render_mode: Optional[str] = None,
) -> gym.Env:
    """``gym.make`` of a ManiSkill task, MIKASA-Robo tasks with the suite's wrappers (Vulkan activated first).

    :param env_id: task id
    :param num_envs: sub-envs of the one simulator (1 with ``sim_backend="cpu"``)
    :param sim_backend: ``"gpu"`` or ``"cpu"``
    :param obs_mode: one of :data:`OBS_MODES`
    :param image_size: camera width and height for the image modes (None: the task's)
    :param env_kwargs: further ``gym.make`` kwargs
    :param render_mode: ManiSkill's render mode (``"rgb_array"`` for videos) or None
    """
    mikasa = check_task(env_id)
    kwargs = dict(env_kwargs or {})
    if image_size is not None and obs_mode != "state":
        kwargs.setdefault("sensor_configs", dict(width=image_size, height=image_size))
    if mikasa:
        kwargs.setdefault("control_mode", "pd_joint_delta_pos")  # the suite's baselines act in joint deltas
    _check_observation_settings(env_id, obs_mode, image_size, ())
    maniskill_mode = {"state": "state", "memory_state": "state_dict"}.get(obs_mode, "rgb")
    env = gym.make(env_id, num_envs=num_envs, sim_backend=sim_backend, render_mode=render_mode,
                   obs_mode=maniskill_mode, **kwargs)
    return _wrap_mikasa(env, env_id, sim_backend, obs_mode, render_mode) if mikasa else env


class ManiSkillEnv(gym.Env):
    """One CPU-simulated ManiSkill (or MIKASA-Robo) task as a plain gymnasium env in SB3's layouts: numpy
    observations of ``obs_mode`` (see :class:`ManiSkillVecEnv`), a float reward, ``info["is_success"]`` on the
    last step. :class:`ManiSkillVecEnv` runs one per worker process; rl-zoo3 and SB3's ``make_vec_env`` take it
    under the ids ``sb3_elmur/<task id>`` (:func:`register_maniskill_envs`).

    :param env_id: ManiSkill or MIKASA-Robo task id
    :param obs_mode: one of :data:`OBS_MODES`
    :param image_size: camera width and height for the image modes (None: the task's)
    :param privileged: privileged observation keys to keep (``"oracle_info"``)
    :param render_mode: ``"rgb_array"`` or None
    :param env_kwargs: further ``gym.make`` kwargs of the task (``reward_mode``, ``control_mode``, ...)
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_id: str, obs_mode: str = "state", image_size: Optional[int] = None,
                 privileged: Sequence[str] = (), render_mode: Optional[str] = None, **env_kwargs: Any) -> None:
        super().__init__()
        _check_observation_settings(env_id, obs_mode, image_size, privileged)
        self.env = make_maniskill_env(env_id, 1, "cpu", obs_mode, image_size, env_kwargs, render_mode)
        self.obs_mode, self.privileged, self.render_mode = obs_mode, tuple(privileged), render_mode
        self.action_space = self.env.get_wrapper_attr("single_action_space")
        self.observation_space = observation_space(self._convert(self.env.reset()[0]))

    def _convert(self, obs: Any) -> TorchObs:
        return convert_observation(obs, self.obs_mode, self.privileged)

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict]:
        super().reset(seed=seed)
        obs, _ = self.env.reset(seed=seed, options=options)
        return _to_numpy(_rows(self._convert(obs), 0)), {}

    def step(self, action: np.ndarray) -> Tuple[Any, float, bool, bool, Dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(th.as_tensor(action).unsqueeze(0))
        cpu = th.device("cpu")
        terminated, truncated, success = (bool(_flags(value, 1, cpu)[0]) for value in
                                          (terminated, truncated, info.get("success")))
        # ManiSkill's raw info is not passed on: MIKASA-Robo's holds the oracle too
        info = {"is_success": success} if terminated or truncated else {}
        return _to_numpy(_rows(self._convert(obs), 0)), float(th.as_tensor(reward).float().reshape(-1)[0]), \
            terminated, truncated, info

    def render(self) -> Optional[np.ndarray]:
        if self.render_mode is None:
            return None
        frame = th.as_tensor(self.env.render())
        return frame.reshape(frame.shape[-3:]).cpu().numpy()

    def close(self) -> None:
        self.env.close()
