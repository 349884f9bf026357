"""The simulator side of :class:`~sb3_elmur.envs.maniskill.ManiSkillVecEnv`: the interface of N envs simulated
together, and its GPU form (one ManiSkill env of N sub-envs). The CPU form runs one env per worker process
(:mod:`sb3_elmur.envs.maniskill.worker`)."""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, List, Optional, Tuple, Union

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

from sb3_elmur.envs.maniskill.observations import (
    TorchObs,
    _flags,
    _rows,
    convert_observation,
    has_task_cue,
    observation_space,
)


class _Batch(ABC):
    """N envs simulated together: observations, rewards and flags as (N, ...) torch tensors."""

    num_envs: int
    action_space: spaces.Space
    observation_space: spaces.Space
    device: th.device

    @abstractmethod
    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[th.Tensor]) -> TorchObs:
        """Reset the envs ``env_idx`` (indices on :attr:`device`; all if None) with ``seeds`` (one per env, or None)
        and return their first observations, in the order of ``env_idx``."""
        raise NotImplementedError

    @abstractmethod
    def step(self, actions: Union[np.ndarray, th.Tensor]) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """Step all envs (actions as a numpy array, or a tensor on :attr:`device`): observations, rewards, terminated,
        truncated and success flags, tensors on :attr:`device`."""
        raise NotImplementedError

    @abstractmethod
    def render(self) -> List[np.ndarray]:
        """One RGB frame (H, W, 3) per env."""
        raise NotImplementedError

    @abstractmethod
    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        """The results of the method ``name`` of the envs ``indices``."""
        raise NotImplementedError

    @abstractmethod
    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        """The attribute ``name`` of the envs ``indices``."""
        raise NotImplementedError

    @abstractmethod
    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        """Set the attribute ``name`` of the envs ``indices``."""
        raise NotImplementedError

    @abstractmethod
    def close(self) -> None:
        """Close the simulator(s)."""
        raise NotImplementedError


class _GpuBatch(_Batch):
    """One GPU-simulated ManiSkill env of ``num_envs`` sub-envs; observations stay on its device, and nothing here
    reads a value back from it (the host would wait for the device), but whether the task has a cue, once."""

    def __init__(self, env: gym.Env, obs_mode: str, privileged: Sequence[str]) -> None:
        self.env = env
        self.obs_mode, self.privileged = obs_mode, tuple(privileged)
        self.task_cue: Optional[bool] = None  # whether the task has one (read from its first observation)
        base = self.env.unwrapped
        self.num_envs, self.device = base.num_envs, base.device
        self.action_space = self.env.get_wrapper_attr("single_action_space")
        self.observation_space = observation_space(self.reset(None, None))

    def _convert(self, obs: Any) -> TorchObs:
        if self.task_cue is None:
            self.task_cue = has_task_cue(obs)
        return convert_observation(obs, self.obs_mode, self.privileged, self.task_cue)

    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[th.Tensor]) -> TorchObs:
        seed = None if seeds is None or seeds[0] is None else [int(seed) for seed in seeds]
        if env_idx is None:
            obs, _ = self.env.reset(seed=seed)
            return self._convert(obs)
        rows = th.as_tensor(env_idx, device=self.device)
        obs, _ = self.env.reset(options=dict(env_idx=rows))  # a partial reset: the other envs go on
        return _rows(self._convert(obs), rows)

    def step(self, actions: Union[np.ndarray, th.Tensor]) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        obs, reward, terminated, truncated, info = self.env.step(th.as_tensor(actions, device=self.device))
        reward = th.as_tensor(reward, device=self.device).float().reshape(self.num_envs)  # sparse rewards are bools
        flags = [_flags(value, self.num_envs, self.device) for value in (terminated, truncated, info.get("success"))]
        return (self._convert(obs), reward, *flags)

    def render(self) -> List[np.ndarray]:
        frames = th.as_tensor(self.env.render())
        return [frame.cpu().numpy() for frame in frames.reshape(-1, *frames.shape[-3:])]

    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        # One simulator for all sub-envs: one call, its result for each index
        result = getattr(self.env.unwrapped, name)(*args, **kwargs)
        return [result] * len(indices)

    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        return [self.env.get_wrapper_attr(name)] * len(indices)

    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        setattr(self.env.unwrapped, name, value)

    def close(self) -> None:
        self.env.close()
