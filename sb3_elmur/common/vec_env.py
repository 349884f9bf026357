"""A base of SB3's ``VecEnv`` for envs that run their ``N`` episodes together, behind one object (numpy arrays, one
simulator, or workers answering one interface) instead of ``N`` gymnasium envs in this process.

SB3's ``DummyVecEnv`` and ``SubprocVecEnv`` answer ``get_attr``, ``set_attr``, ``env_method`` and
``env_is_wrapped`` from their sub-env objects; here there are none, so :class:`BatchedVecEnv` writes those answers
once for the T-Maze, noisy-recall and ManiSkill envs, with their seeding and the infos of finished episodes.

An env whose ``tensor_device`` is a device speaks torch tensors there instead of numpy arrays, for
:class:`~sb3_elmur.ElmurPPO` (a GPU-simulated env: nothing goes through the host): it takes actions as tensors, returns
observations, rewards and dones as tensors, and the infos of the envs whose episode ended hold their
``terminal_observation`` (as SB3's auto-reset has it), from which :func:`host_dones` reads the done flags on the host.
"""

from typing import Any, ClassVar, Dict, List, Optional, Sequence, Type, Union

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices


class BatchedVecEnv(VecEnv):
    """An SB3 ``VecEnv`` whose envs are one object: ``get_attr`` reads this object (the same value for every env,
    except the per-env state named in :attr:`per_env_attrs`), ``set_attr`` sets it (for all envs at once: a subset
    cannot be honoured), ``env_method`` calls it once and gives every env the result (no repeated side effects), and
    no gymnasium wrappers are involved. Subclasses whose envs live elsewhere (a simulator, workers) override the
    first three to ask them.

    :param num_envs: number of envs
    :param observation_space: observation space of one env
    :param action_space: action space of one env
    :param seed: seed of the first reset, as ``seed(seed)`` before it (env ``i`` gets ``seed + i``); None: none
    """

    # Per-env state readable through ``get_attr`` (one value per env, not settable): name -> (num_envs,) array attribute
    per_env_attrs: ClassVar[Dict[str, str]] = {}
    # Where the env takes and returns torch tensors (see the module's docstring); None: numpy arrays, SB3's API
    tensor_device: Optional[th.device] = None

    def __init__(
        self,
        num_envs: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        seed: Optional[int] = None,
    ) -> None:
        if not hasattr(self, "render_mode"):
            self.render_mode = None  # VecEnv.__init__ reads it through get_attr
        super().__init__(num_envs, observation_space, action_space)
        if seed is not None:
            # Seeds reach the next reset only (SB3's convention): seed=s behaves like seed(s) + reset()
            self.seed(seed)

    def _get_indices(self, indices: VecEnvIndices) -> List[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, (int, np.integer)):
            return [int(indices)]
        return [int(i) for i in indices]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> List[Any]:
        indices = self._get_indices(indices)
        if attr_name in self.per_env_attrs:
            values = getattr(self, self.per_env_attrs[attr_name])
            return [values[i].item() for i in indices]
        value = getattr(self, attr_name)
        return [value for _ in indices]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        name = type(self).__name__
        if attr_name in self.per_env_attrs:
            raise AttributeError(f"`{attr_name}` is per-env state of {name} and cannot be set")
        # All envs share a single object, so a partial assignment cannot be honored
        if sorted(set(self._get_indices(indices))) != list(range(self.num_envs)):
            raise ValueError(f"{name} attributes are shared by all envs, cannot set `{attr_name}` for a subset")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> List[Any]:
        # The batch stands in for every sub-env: call once (no repeated side effects), replicate the result
        indices = self._get_indices(indices)
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in indices]

    def env_is_wrapped(self, wrapper_class: Type[gym.Wrapper], indices: VecEnvIndices = None) -> List[bool]:
        return [False for _ in self._get_indices(indices)]

    def close(self) -> None:
        pass

    def _step_infos(self, done_idx: np.ndarray, terminal_observations: Sequence[Any], is_success: Sequence[bool],
                    timeouts: Sequence[bool]) -> List[Dict[str, Any]]:
        """The infos of one step in SB3's layout: an empty dict for every env still in its episode, and for the
        envs ``done_idx`` whose episode ended, its last observation, success and whether it ended by time-out
        (``TimeLimit.truncated``: SB3's algorithms then bootstrap from the last observation).

        :param done_idx: the envs whose episode ended at this step
        :param terminal_observations: their last observations, in the order of ``done_idx``
        :param is_success: whether each succeeded, in the same order
        :param timeouts: whether each was cut by a time limit, in the same order
        """
        # Fresh dicts (cheap) so that a consumer writing into an info cannot leak into later steps
        infos: List[Dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for position, env in enumerate(done_idx.tolist()):
            infos[env] = {
                "terminal_observation": terminal_observations[position],
                "is_success": is_success[position],
                "TimeLimit.truncated": timeouts[position],
            }
        return infos


def tensor_device(env: VecEnv) -> Optional[th.device]:
    """The device where ``env`` (or the env it wraps) takes actions and returns observations, rewards and dones as
    torch tensors (see the module's docstring), or None for numpy arrays."""
    return getattr(env, "tensor_device", None)


def host_dones(dones: Union[np.ndarray, th.Tensor], infos: List[Dict[str, Any]]) -> np.ndarray:
    """The done flags of a step as a numpy array, without a copy from the device: ``dones`` as they are from an env of
    numpy arrays; from an env of tensors, read from its ``infos``, which hold the ``terminal_observation`` of every
    env whose episode ended.

    :param dones: the dones ``env.step`` returned
    :param infos: the infos it returned
    """
    if not isinstance(dones, th.Tensor):
        return np.asarray(dones)
    return np.array(["terminal_observation" in info for info in infos], dtype=bool)
