"""ManiSkill's batched observations and flags in SB3's layouts, and the helpers that move their rows about."""

from collections.abc import Sequence
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_elmur.common.checks import check_int
from sb3_elmur.envs import mikasa_family

OBS_MODES = ("state", "rgb", "rgb+joints", "memory_state")
# Observation entries that give the answer of a memory task away (MIKASA-Robo): never shown unless asked for.
PRIVILEGED_KEYS = ("oracle_info",)
# MIKASA-Robo fills ``task_cue`` (and ``oracle_info``) with this value in tasks that have none.
_NO_VALUE = 4242424242

TorchObs = Union[th.Tensor, Dict[str, th.Tensor]]


def _check_observation_settings(env_id: str, obs_mode: str, image_size: Optional[int], privileged: Sequence[str]) -> None:
    if obs_mode not in OBS_MODES:
        raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
    if obs_mode == "memory_state" and mikasa_family(env_id) != "RememberColor":
        raise ValueError(f"obs_mode='memory_state' is defined for the RememberColor tasks, not {env_id}")
    if image_size is not None:
        check_int("image_size", image_size)
    unknown = [key for key in privileged if key not in PRIVILEGED_KEYS]
    if unknown:
        raise ValueError(f"unknown privileged keys {unknown}: expected some of {PRIVILEGED_KEYS}")
    if privileged and obs_mode == "rgb":
        raise ValueError("obs_mode='rgb' gives images only: ask for privileged entries with 'rgb+joints' or 'state'")


def _leaves(observation: Any) -> List[th.Tensor]:
    """The leaves of a (nested) observation dict as (N, k) float tensors, in the dict's order."""
    if isinstance(observation, dict):
        return [leaf for value in observation.values() for leaf in _leaves(value)]
    tensor = th.as_tensor(observation)
    return [tensor.reshape(tensor.shape[0], -1).float()]


def has_task_cue(observation: Any) -> bool:
    """Whether a batched ManiSkill observation holds a MIKASA-Robo ``task_cue`` (an instruction the policy may see):
    tasks without one fill it with a marker value. This reads values (on a GPU, the host waits for the device): ask
    once per env, the answer holds for every observation of the task."""
    task_cue = observation.get("task_cue") if isinstance(observation, dict) else None
    return task_cue is not None and not bool((th.as_tensor(task_cue) == _NO_VALUE).any())


def _cues(observation: Dict[str, Any], privileged: Sequence[str], task_cue: Optional[bool]) -> Dict[str, th.Tensor]:
    """MIKASA-Robo's ``task_cue`` where the task has one (see :func:`has_task_cue`; None: look) and the privileged
    entries asked for."""
    cues = {}
    if has_task_cue(observation) if task_cue is None else task_cue:
        cues["task_cue"] = _leaves(observation["task_cue"])[0]
    for key in privileged:
        if key not in observation:
            raise KeyError(f"privileged observation {key!r} is not among this task's observations")
        cues[key] = _leaves(observation[key])[0]
    return cues


def convert_observation(observation: Any, obs_mode: str, privileged: Sequence[str] = (),
                        task_cue: Optional[bool] = None) -> TorchObs:
    """A batched ManiSkill observation in the SB3 layout of ``obs_mode`` (see :class:`ManiSkillVecEnv`).

    MIKASA-Robo's privileged entries never pass unless named in ``privileged``: the state vector, the images and
    the robot's joint/TCP vector are picked by name, everything else is dropped. ``task_cue``: whether the task has
    a cue to pass on (:func:`has_task_cue` of its first observation; None: look, which reads values).
    """
    if not isinstance(observation, dict):  # ManiSkill's state mode: one flat tensor
        observation = {"state": observation}
    if obs_mode == "state":
        return th.cat([_leaves(observation["state"])[0], *_cues(observation, privileged, task_cue).values()], dim=1)
    if obs_mode == "memory_state":
        parts = [observation["extra"]["tcp_pose"], observation["agent"]["qpos"], observation["agent"]["qvel"],
                 observation["objects"], *_cues(observation, privileged, task_cue).values()]
        return th.cat([_leaves(part)[0] for part in parts], dim=1)
    cameras = [sensor["rgb"] for sensor in observation["sensor_data"].values() if "rgb" in sensor]
    images = th.cat(cameras, dim=-1).permute(0, 3, 1, 2).contiguous()  # (N, 3 * cameras, H, W)
    if obs_mode == "rgb":
        return images
    # The joint/TCP vector as MIKASA-Robo's baselines build it: the "extra" entries, then the robot's joints
    joints = th.cat(_leaves({"extra": observation.get("extra", {}), "agent": observation["agent"]}), dim=1)
    return {"rgb": images, "joints": joints, **_cues(observation, privileged, task_cue)}


def observation_space(sample: TorchObs) -> spaces.Space:
    """The SB3 space of converted observations like ``sample`` (one batch row per env)."""
    if isinstance(sample, dict):
        return spaces.Dict({key: observation_space(value) for key, value in sample.items()})
    if sample.dtype == th.uint8:
        return spaces.Box(0, 255, tuple(sample.shape[1:]), np.uint8)
    return spaces.Box(-np.inf, np.inf, tuple(sample.shape[1:]), np.float32)


def _to_numpy(obs: TorchObs) -> Union[np.ndarray, Dict[str, np.ndarray]]:
    if isinstance(obs, dict):
        return {key: value.cpu().numpy() for key, value in obs.items()}
    return obs.cpu().numpy()


def _rows(obs: Any, index: Any) -> Any:
    if isinstance(obs, dict):
        return {key: value[index] for key, value in obs.items()}
    return obs[index]


def _set_rows(obs: Any, index: Any, values: Any) -> None:
    if isinstance(obs, dict):
        for key in obs:
            obs[key][index] = values[key]
    else:
        obs[index] = values


def _stack(rows: List[Any]) -> TorchObs:
    """Numpy observations of single envs as one batch of tensors."""
    if isinstance(rows[0], dict):
        return {key: th.as_tensor(np.stack([row[key] for row in rows])) for key in rows[0]}
    return th.as_tensor(np.stack(rows))


def obs_device(obs: TorchObs) -> th.device:
    return next(iter(obs.values())).device if isinstance(obs, dict) else obs.device


def _flags(value: Any, num_envs: int, device: th.device) -> th.Tensor:
    """A flag of every env ((N,) bool) from ManiSkill's tensor, bool or None (no such signal: all False)."""
    if value is None:
        return th.zeros(num_envs, dtype=th.bool, device=device)
    return th.as_tensor(value, device=device).reshape(num_envs).bool()
