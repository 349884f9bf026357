"""ManiSkill 3 and MIKASA-Robo tasks as an SB3 ``VecEnv`` (:class:`ManiSkillVecEnv`), over the GPU or the CPU
backend."""

import functools
import time
from collections.abc import Sequence
from typing import Any, List, Optional

import numpy as np
import torch as th
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from sb3_elmur.common.checks import check_int
from sb3_elmur.common.vec_env import BatchedVecEnv
from sb3_elmur.envs.maniskill.batch import _Batch, _GpuBatch
from sb3_elmur.envs.maniskill.env import ManiSkillEnv, make_maniskill_env
from sb3_elmur.envs.maniskill.observations import (
    TorchObs,
    _check_observation_settings,
    _rows,
    _set_rows,
    _to_numpy,
    obs_device,
)
from sb3_elmur.envs.maniskill.tasks import check_task
from sb3_elmur.envs.maniskill.worker import _CpuBatch


class ManiSkillVecEnv(BatchedVecEnv):
    """A ManiSkill 3 task (or MIKASA-Robo memory task) as an SB3 ``VecEnv``.

    Observations by ``obs_mode``: ``"state"``, the task's state vector (Box, float32); ``"rgb"``, the cameras'
    images stacked on the channel axis (Box ``(3 * cameras, H, W)`` uint8, for ``CnnElmurPolicy``);
    ``"rgb+joints"``, a Dict of those images (``"rgb"``) and the robot's joint positions, velocities and TCP pose
    (``"joints"``), for ``MultiInputElmurPolicy``; ``"memory_state"`` (RememberColor tasks), the joints and each
    cube's position and visibility as the cameras show them (the colour shows in the first steps only). MIKASA-Robo's
    ``task_cue`` is appended where a task has one; its ``oracle_info`` (the answer) is left out unless named in
    ``privileged``, and the raw info (which holds it too) is never passed on.

    Each finished episode gets ``info["episode"]`` (return, length, time) and ``info["is_success"]`` (the task's
    success signal at the last step) on the step it ends, like ``VecMonitor``; a time-out sets
    ``info["TimeLimit.truncated"]``; ``info["terminal_observation"]`` holds the last observation, and the returned
    one is the first of the next episode (only the done envs are reset).

    :param env_id: ManiSkill task id (e.g. ``"PickCube-v1"``) or MIKASA-Robo task id (``"RememberColor3-v0"``)
    :param n_envs: number of envs
    :param obs_mode: one of :data:`OBS_MODES`
    :param image_size: camera resolution (square) for the image modes; None keeps the task's
    :param privileged: privileged observation keys to keep (``"oracle_info"``)
    :param sim_backend: ``"auto"`` (GPU simulation when CUDA is available), ``"gpu"`` or ``"cpu"``
    :param device_observations: with GPU simulation, speak torch tensors on the simulator's device (for
        :class:`~sb3_elmur.ElmurPPO`; ``tensor_device``): observations, rewards and dones are returned as tensors and
        actions taken as tensors, so that a step copies nothing through the host but the done flags and episode
        statistics that SB3's infos need (one copy per step); an attribute that may be switched between runs
    :param seed: seed of the first reset (env ``i`` gets ``seed + i``); ``VecEnv.seed`` sets the next one
    :param render_mode: ``"rgb_array"`` to render (videos), or None
    :param start_method: multiprocessing start method of the CPU workers (default: forkserver)
    :param env_kwargs: further ``gym.make`` kwargs of the task (``reward_mode``, ``control_mode``, ...)
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int = 1,
        obs_mode: str = "state",
        image_size: Optional[int] = None,
        privileged: Sequence[str] = (),
        sim_backend: str = "auto",
        device_observations: bool = False,
        seed: Optional[int] = None,
        render_mode: Optional[str] = None,
        start_method: Optional[str] = None,
        **env_kwargs: Any,
    ) -> None:
        # Every argument is checked before any work (task lookup, simulator, workers): a bad seed would otherwise
        # fail only at the first reset, inside a worker.
        if seed is not None:
            seed = check_int("ManiSkillVecEnv seed", seed, minimum=0)
        _check_observation_settings(env_id, obs_mode, image_size, privileged)
        n_envs = check_int("n_envs", n_envs)
        if sim_backend not in ("auto", "gpu", "cpu"):
            raise ValueError(f"sim_backend must be 'auto', 'gpu' or 'cpu', got {sim_backend!r}")
        if sim_backend == "auto":
            sim_backend = "gpu" if th.cuda.is_available() else "cpu"
        if sim_backend == "gpu" and not th.cuda.is_available():
            raise ValueError("sim_backend='gpu' needs a CUDA device; use sim_backend='cpu'")
        if device_observations and sim_backend != "gpu":
            raise ValueError("device_observations=True needs GPU simulation (sim_backend='gpu')")
        self.env_id, self.obs_mode, self.sim_backend = env_id, obs_mode, sim_backend
        check_task(env_id)  # an unknown id or missing assets fail here, not in a worker
        if sim_backend == "gpu":
            env = make_maniskill_env(env_id, n_envs, "gpu", obs_mode, image_size, env_kwargs, render_mode)
            batch: _Batch = _GpuBatch(env, obs_mode, privileged)
        else:
            make_env = functools.partial(ManiSkillEnv, env_id, obs_mode, image_size, privileged, render_mode,
                                         **env_kwargs)
            batch = _CpuBatch(make_env, n_envs, start_method)
        self._setup(batch, device_observations, seed)

    def _setup(self, batch: _Batch, device_observations: bool, seed: Optional[int] = None) -> None:
        self.batch, self.device_observations = batch, device_observations
        # (reads render_mode from the batch)
        super().__init__(batch.num_envs, batch.observation_space, batch.action_space, seed=seed)
        self.device = batch.device
        self.episode_returns = th.zeros(batch.num_envs, device=self.device)
        self.episode_lengths = th.zeros(batch.num_envs, dtype=th.long, device=self.device)
        self.start_time = time.time()
        self._actions: Optional[np.ndarray] = None

    @property
    def tensor_device(self) -> Optional[th.device]:
        """Where this env takes and returns tensors (``device_observations``), or None: numpy arrays."""
        return self.device if self.device_observations else None

    def _output(self, obs: TorchObs) -> Any:
        return obs if self.device_observations else _to_numpy(obs)

    def reset(self) -> Any:
        obs = self.batch.reset(list(self._seeds), None)
        self._reset_seeds()
        self.episode_returns.zero_()
        self.episode_lengths.zero_()
        return self._output(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, reward, terminated, truncated, success = self.batch.step(self._actions)
        self.episode_returns += reward
        self.episode_lengths += 1
        dones = terminated | truncated
        # The one read of the simulator's device per step (SB3's infos name every env whose episode ended, with its
        # statistics): flags, statistics and rewards in one copy.
        host = th.stack([flag.to(reward.dtype) for flag in (dones, terminated, truncated, success, self.episode_lengths)]
                        + [self.episode_returns, reward]).cpu().numpy()
        host_done, host_terminated, host_truncated, host_success = host[:4] > 0
        out_rewards, out_dones = (reward, dones) if self.device_observations else (host[6], host_done)
        done_idx = np.flatnonzero(host_done)
        if not len(done_idx):
            return self._output(obs), out_rewards, out_dones, self._step_infos(done_idx, [], [], [])
        # On the device, for the simulator's partial reset: a copy of the indices from the host
        rows = th.as_tensor(done_idx, device=obs_device(obs))
        terminal = self._output(_rows(obs, rows))  # a copy: obs is overwritten below
        infos = self._step_infos(done_idx, [_rows(terminal, position) for position in range(len(done_idx))],
                                 host_success[done_idx].tolist(), (host_truncated & ~host_terminated)[done_idx].tolist())
        lengths, returns = host[4, done_idx].astype(np.int64).tolist(), host[5, done_idx].tolist()
        elapsed = round(time.time() - self.start_time, 6)
        for position, env in enumerate(done_idx.tolist()):
            infos[env]["episode"] = {"r": returns[position], "l": lengths[position], "t": elapsed}
        self.episode_returns[rows] = 0
        self.episode_lengths[rows] = 0
        # SB3's auto-reset: only the done envs start a new episode, unseeded
        _set_rows(obs, rows, self.batch.reset(None, rows))
        return self._output(obs), out_rewards, out_dones, infos

    def close(self) -> None:
        self.batch.close()

    def get_images(self) -> Sequence[Optional[np.ndarray]]:
        if self.render_mode != "rgb_array":
            raise ValueError(f"render needs render_mode='rgb_array' (got {self.render_mode!r})")
        return self.batch.render()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> List[Any]:
        return self.batch.get_attr(attr_name, self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self.batch.set_attr(attr_name, value, self._get_indices(indices))

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> List[Any]:
        return self.batch.call(method_name, self._get_indices(indices), method_args, method_kwargs)
