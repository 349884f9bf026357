"""ManiSkill 3 and MIKASA-Robo tasks as an SB3 ``VecEnv``.

:class:`ManiSkillVecEnv` runs ``n_envs`` copies of a ManiSkill task behind SB3's ``VecEnv`` interface. With a CUDA
device it is one GPU-simulated ManiSkill env with ``num_envs=n_envs`` (partial resets of the done envs); without
one, ``n_envs`` CPU-simulated envs in subprocesses (ManiSkill's CPU backend holds one env per process). Both share
everything above the simulator: observations in SB3 layouts, per-episode statistics as ``VecMonitor`` gives them,
``is_success``, time-limit truncation and terminal observations.

``import sb3_elmur`` does not import this module, so it stays light; importing it imports ManiSkill (where it is
installed) and registers every task as ``sb3_elmur/<task id>``, a single :class:`ManiSkillEnv` (rl-zoo3's
``--gym-packages sb3_elmur.envs.maniskill``). ManiSkill needs a Vulkan device: on a machine without a GPU, install a
CPU one once with ``python -m sb3_elmur.envs.vulkan install``; this module activates it in every process. SAPIEN's and
ManiSkill's warnings about the fallbacks this involves (SAPIEN's own Vulkan loader, rendering on the CPU), which they
print in every process, are hidden: the main process says once, in one line, what is used.
"""

import functools
import importlib.util
import logging
import multiprocessing as mp
import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper, VecEnv, VecEnvIndices, VecEnvStepReturn

from sb3_elmur.common.checks import check_int
from sb3_elmur.envs import mikasa_family, vulkan
from sb3_elmur.envs.vulkan.installer import _ICD, _resolve_dir

OBS_MODES = ("state", "rgb", "rgb+joints", "memory_state")
# Observation entries that give the answer of a memory task away (MIKASA-Robo): never shown unless asked for.
PRIVILEGED_KEYS = ("oracle_info",)
# MIKASA-Robo fills ``task_cue`` (and ``oracle_info``) with this value in tasks that have none.
_NO_VALUE = 4242424242

TorchObs = Union[th.Tensor, Dict[str, th.Tensor]]

# MIKASA-Robo's own wrappers by task family (the suite's PPO baselines apply the same). Besides the first, which
# adds ``task_cue`` and ``oracle_info`` to the observations, they only write step, reward and task facts onto
# rendered frames (videos). Their zero-action wrapper is left out: at the baselines' default it does nothing.
_MIKASA_RENDER_WRAPPERS = {
    "ShellGame": ("RenderStepInfoWrapper", "ShellGameRenderCupInfoWrapper", "RenderRewardInfoWrapper",
                  "DebugRewardWrapper"),
    "Intercept": ("RenderStepInfoWrapper", "RenderRewardInfoWrapper", "DebugRewardWrapper"),
    "TakeItBack": ("RenderStepInfoWrapper", "RenderRewardInfoWrapper", "DebugRewardWrapper"),
    "Rotate": ("RenderStepInfoWrapper", "RenderRewardInfoWrapper", "RotateRenderAngleInfoWrapper",
               "DebugRewardWrapper"),
    "RememberShapeAndColor": ("RememberShapeAndColorInfoWrapper", "RenderStepInfoWrapper",
                              "RenderRewardInfoWrapper", "DebugRewardWrapper"),
    "RememberShape": ("RememberShapeInfoWrapper", "RenderStepInfoWrapper", "RenderRewardInfoWrapper",
                      "DebugRewardWrapper"),
    "RememberColor": ("RememberColorInfoWrapper", "RenderStepInfoWrapper", "RenderRewardInfoWrapper",
                      "DebugRewardWrapper"),
    "BunchOfColors": ("MemoryCapacityInfoWrapper", "RenderStepInfoWrapper", "RenderRewardInfoWrapper",
                      "DebugRewardWrapper"),
    "SeqOfColors": ("MemoryCapacityInfoWrapper", "RenderStepInfoWrapper", "RenderRewardInfoWrapper",
                    "DebugRewardWrapper"),
    "ChainOfColors": ("MemoryCapacityInfoWrapper", "RenderStepInfoWrapper", "RenderRewardInfoWrapper",
                      "DebugRewardWrapper"),
}


# What SAPIEN (at import) and ManiSkill (at every env's creation) say, in every process, about their fallbacks: no
# system libvulkan (SAPIEN's own loader is used), no CUDA device (rendering on the CPU). Both are expected where
# lavapipe is the Vulkan driver; :func:`_say_what_is_used` says it once instead.
_SAPIEN_LOADER_WARNING = r"Failed to find system libvulkan"
_CUDA_RENDER_FALLBACK = "CUDA device was not found"
_said_what_is_used = False


class _HideRenderFallback(logging.Filter):
    """Drops ManiSkill's log message that rendering falls back to the CPU (said once by :func:`_say_what_is_used`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _CUDA_RENDER_FALLBACK not in record.getMessage()


def _say_what_is_used(vulkan_found: bool) -> None:
    """Say (once, on stderr, in the main process only: workers stay silent) which Vulkan driver and loader ManiSkill
    uses and where it renders.

    :param vulkan_found: what ``vulkan.activate`` returned (False: neither lavapipe nor a driver of the system)
    """
    global _said_what_is_used
    if _said_what_is_used or mp.parent_process() is not None:
        return
    _said_what_is_used = True
    icd = os.environ.get("VK_ICD_FILENAMES")
    lavapipe = _resolve_dir(None) / _ICD
    if not vulkan_found:
        driver = "no Vulkan driver (install one: python -m sb3_elmur.envs.vulkan install)"
    elif icd is not None and Path(icd) == lavapipe:
        driver = f"lavapipe (CPU Vulkan) from {lavapipe.parent}"
    elif icd:
        driver = f"the Vulkan driver of VK_ICD_FILENAMES={icd}"
    else:
        driver = "the system's Vulkan driver"
    loader = "SAPIEN's own Vulkan loader" if os.environ.get("SAPIEN_VULKAN_LIBRARY_PATH") else "the system's libvulkan"
    render = "on the GPU" if th.cuda.is_available() else "on the CPU (no CUDA device)"
    print(f"sb3_elmur: ManiSkill uses {driver}, {loader}, rendering {render}", file=sys.stderr, flush=True)


class MissingAssetsError(RuntimeError):
    """A ManiSkill task needs assets that are not downloaded (and cannot be, from this machine)."""


def _import_maniskill() -> None:
    """Import ManiSkill (registering its task ids) with a usable Vulkan device, its fallback warnings hidden and
    what is used said once (:func:`_say_what_is_used`)."""
    vulkan_found = vulkan.activate()
    # Before SAPIEN's import, which warns; a filter of this one message only, for the life of the process.
    warnings.filterwarnings("ignore", message=_SAPIEN_LOADER_WARNING, category=UserWarning, module=r"sapien\.")
    try:
        import mani_skill.envs  # noqa: F401
    except ImportError as error:
        raise ImportError("ManiSkill tasks need the mani-skill package: pip install -e '.[maniskill]'") from error
    from mani_skill.utils.logging_utils import logger

    if not any(isinstance(f, _HideRenderFallback) for f in logger.filters):
        logger.addFilter(_HideRenderFallback())
    _say_what_is_used(vulkan_found)


def _import_mikasa() -> None:
    _import_maniskill()
    try:
        import mikasa_robo_suite.rl.memory_envs  # noqa: F401  (registers the task ids)
    except ImportError as error:
        raise ImportError(
            "MIKASA-Robo tasks need the mikasa-robo-suite package, installed without its dependencies (they pin "
            "an old torch): pip install -e '.[maniskill]' && pip install --no-deps mikasa-robo-suite==1.0.0"
        ) from error


def mikasa_env_ids() -> List[str]:
    """The MIKASA-Robo task ids (imports the suite)."""
    _import_mikasa()
    from mani_skill.utils.registration import REGISTERED_ENVS

    return sorted(env_id for env_id, spec in REGISTERED_ENVS.items()
                  if spec.cls.__module__.startswith("mikasa_robo_suite.rl."))


def check_task(env_id: str) -> bool:
    """Check that ``env_id`` is a ManiSkill or MIKASA-Robo task whose assets are here.

    :return: whether it is a MIKASA-Robo task
    :raise gymnasium.error.NameNotFound: for an unknown id
    :raise MissingAssetsError: for a task whose assets are not downloaded
    """
    _import_maniskill()
    mikasa = mikasa_family(env_id) is not None
    if mikasa:
        _import_mikasa()
    import mani_skill
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        raise gym.error.NameNotFound(f"{env_id!r} is neither a ManiSkill nor a MIKASA-Robo task id")
    missing = []
    for asset_id in REGISTERED_ENVS[env_id].asset_download_ids or []:
        sources = (assets.expand_data_group_into_individual_data_source_ids(asset_id)
                   if asset_id in assets.DATA_GROUPS else [asset_id])
        missing += [source for source in sources if not assets.is_data_source_downloaded(source)]
    if missing:
        raise MissingAssetsError(
            f"{env_id} needs ManiSkill assets that are not in {mani_skill.ASSET_DIR}: "
            f"{', '.join(sorted(set(missing)))}. Download them where their server can be reached "
            f"(python -m mani_skill.utils.download_asset {' '.join(REGISTERED_ENVS[env_id].asset_download_ids)}) and "
            "copy the folder here (MS_ASSET_DIR names another place)"
        )
    return mikasa


def _leaves(observation: Any) -> List[th.Tensor]:
    """The leaves of a (nested) observation dict as (N, k) float tensors, in the dict's order."""
    if isinstance(observation, dict):
        return [leaf for value in observation.values() for leaf in _leaves(value)]
    tensor = th.as_tensor(observation)
    return [tensor.reshape(tensor.shape[0], -1).float()]


def _cues(observation: Dict[str, Any], privileged: Sequence[str]) -> Dict[str, th.Tensor]:
    """MIKASA-Robo's ``task_cue`` where the task has one (an instruction the policy may see) and the privileged
    entries asked for."""
    cues = {}
    task_cue = observation.get("task_cue")
    if task_cue is not None and not bool((th.as_tensor(task_cue) == _NO_VALUE).any()):
        cues["task_cue"] = _leaves(task_cue)[0]
    for key in privileged:
        if key not in observation:
            raise KeyError(f"privileged observation {key!r} is not among this task's observations")
        cues[key] = _leaves(observation[key])[0]
    return cues


def convert_observation(observation: Any, obs_mode: str, privileged: Sequence[str] = ()) -> TorchObs:
    """A batched ManiSkill observation in the SB3 layout of ``obs_mode`` (see :class:`ManiSkillVecEnv`).

    MIKASA-Robo's privileged entries never pass unless named in ``privileged``: the state vector, the images and
    the robot's joint/TCP vector are picked by name, everything else is dropped.
    """
    if not isinstance(observation, dict):  # ManiSkill's state mode: one flat tensor
        observation = {"state": observation}
    if obs_mode == "state":
        return th.cat([_leaves(observation["state"])[0], *_cues(observation, privileged).values()], dim=1)
    if obs_mode == "memory_state":
        parts = [observation["extra"]["tcp_pose"], observation["agent"]["qpos"], observation["agent"]["qvel"],
                 observation["objects"], *_cues(observation, privileged).values()]
        return th.cat([_leaves(part)[0] for part in parts], dim=1)
    cameras = [sensor["rgb"] for sensor in observation["sensor_data"].values() if "rgb" in sensor]
    images = th.cat(cameras, dim=-1).permute(0, 3, 1, 2).contiguous()  # (N, 3 * cameras, H, W)
    if obs_mode == "rgb":
        return images
    # The joint/TCP vector as MIKASA-Robo's baselines build it: the "extra" entries, then the robot's joints
    joints = th.cat(_leaves({"extra": observation.get("extra", {}), "agent": observation["agent"]}), dim=1)
    return {"rgb": images, "joints": joints, **_cues(observation, privileged)}


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
    if mikasa:
        from mikasa_robo_suite.rl.utils import wrappers

        if sim_backend == "cpu" and mikasa_family(env_id) == "RememberColor":
            env = _CubesReturnOnCpu(env)
        env = wrappers.StateOnlyTensorToDictWrapper(env)
        if obs_mode == "memory_state":
            env = _CubesAsSeen(env)
        for name in _MIKASA_RENDER_WRAPPERS[mikasa_family(env_id)]:
            env = getattr(wrappers, name)(env)
    return env


class _CubesReturnOnCpu(gym.Wrapper):
    """Puts RememberColor's cubes back on the table after the cue, where CPU simulation leaves them hidden.

    The task hides every cube (lifted to z = 1,000 m) until ``TIME_OFFSET + DELTA_TIME`` steps, then means to put
    them back at the positions it read at the start of the same step; with the CPU backend those are already the
    hidden ones, so the cubes never come back and fall from 1,000 m for the rest of the episode (mikasa-robo-suite
    1.0.0, measured). This wrapper sets them to the places the episode drew for them, once, and stops them."""

    def step(self, action: Any) -> Tuple[Any, Any, Any, Any, Dict[str, Any]]:
        result = self.env.step(action)
        task = self.unwrapped
        due = task.elapsed_steps >= task.TIME_OFFSET + task.DELTA_TIME
        for key, cube in task.cubes.items():
            lost = due & (cube.pose.p[:, 2] > 100)
            if bool(lost.any()):
                pose = cube.pose.raw_pose.clone()
                pose[lost, :3] = task.initial_poses[key][lost].to(pose)
                cube.pose = pose
                cube.set_linear_velocity(th.zeros_like(cube.linear_velocity))
        return result


class _CubesAsSeen(gym.ObservationWrapper):
    """Adds ``objects``: each cube's position and visibility as the cameras show them, by colour, (N, 4 * colours).
    A RememberColor task shows the target cube alone at the start, then hides every cube, then shows them all
    at their places: the colour is in the first steps only, so a policy must remember it."""

    def observation(self, observation: Dict[str, Any]) -> Dict[str, Any]:
        cubes = self.unwrapped.cubes
        columns = []
        for key in sorted(cubes):
            position = cubes[key].pose.p
            visible = (position[:, 2:3] < 100).float()  # the task hides a cube by lifting it 1,000 m
            columns += [position * visible, visible]
        return {**observation, "objects": th.cat(columns, dim=1)}


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


def register_maniskill_envs() -> List[str]:
    """Register every ManiSkill task (and MIKASA-Robo task, where the suite is installed) as
    ``sb3_elmur/<task id>``, a :class:`ManiSkillEnv` (for rl-zoo3: ``--gym-packages sb3_elmur.envs.maniskill``).

    :return: the registered ids
    """
    _import_maniskill()
    try:
        _import_mikasa()
    except ImportError:
        pass
    from mani_skill.utils.registration import REGISTERED_ENVS

    ids = []
    for env_id in REGISTERED_ENVS:
        ours = f"sb3_elmur/{env_id}"
        if ours not in gym.registry:  # the task truncates itself: no max_episode_steps here
            gym.register(ours, entry_point="sb3_elmur.envs.maniskill:ManiSkillEnv", kwargs=dict(env_id=env_id))
        ids.append(ours)
    return ids


class _Batch(ABC):
    """N envs simulated together: observations, rewards and flags as (N, ...) torch tensors."""

    num_envs: int
    action_space: spaces.Space
    observation_space: spaces.Space
    device: th.device

    @abstractmethod
    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[np.ndarray]) -> TorchObs:
        """Reset the envs ``env_idx`` (all if None) with ``seeds`` (one per env, or None) and return their first
        observations, in the order of ``env_idx``."""
        raise NotImplementedError

    @abstractmethod
    def step(self, actions: np.ndarray) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """Step all envs: observations, rewards, terminated, truncated and success flags."""
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


def _flags(value: Any, num_envs: int, device: th.device) -> th.Tensor:
    """A flag of every env ((N,) bool) from ManiSkill's tensor, bool or None (no such signal: all False)."""
    if value is None:
        return th.zeros(num_envs, dtype=th.bool, device=device)
    return th.as_tensor(value, device=device).reshape(num_envs).bool()


class _GpuBatch(_Batch):
    """One GPU-simulated ManiSkill env of ``num_envs`` sub-envs; observations stay on its device."""

    def __init__(self, env: gym.Env, obs_mode: str, privileged: Sequence[str]) -> None:
        self.env = env
        self.obs_mode, self.privileged = obs_mode, tuple(privileged)
        base = self.env.unwrapped
        self.num_envs, self.device = base.num_envs, base.device
        self.action_space = self.env.get_wrapper_attr("single_action_space")
        self.observation_space = observation_space(self.reset(None, None))

    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[np.ndarray]) -> TorchObs:
        seed = None if seeds is None or seeds[0] is None else [int(seed) for seed in seeds]
        if env_idx is None:
            obs, _ = self.env.reset(seed=seed)
            return convert_observation(obs, self.obs_mode, self.privileged)
        rows = th.as_tensor(env_idx, device=self.device)
        obs, _ = self.env.reset(options=dict(env_idx=rows))  # a partial reset: the other envs go on
        return _rows(convert_observation(obs, self.obs_mode, self.privileged), rows)

    def step(self, actions: np.ndarray) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        obs, reward, terminated, truncated, info = self.env.step(th.as_tensor(actions, device=self.device))
        reward = th.as_tensor(reward, device=self.device).float().reshape(self.num_envs)  # sparse rewards are bools
        flags = [_flags(value, self.num_envs, self.device) for value in (terminated, truncated, info.get("success"))]
        return (convert_observation(obs, self.obs_mode, self.privileged), reward, *flags)

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


class WorkerError(RuntimeError):
    """A ManiSkill worker process failed (its exception type and message)."""


class _Failure:
    """An exception raised in a worker, sent to the parent (which raises it there, naming the worker)."""

    def __init__(self, error: BaseException, fatal: bool) -> None:
        self.kind, self.message, self.fatal = type(error).__name__, str(error), fatal

    def raise_in_parent(self, worker: int) -> None:
        message = f"ManiSkill worker {worker}: {self.kind}: {self.message}"
        # AttributeError stays one: SB3's VecEnv asks for attributes that an env may lack (render_mode)
        raise (AttributeError if self.kind == "AttributeError" and not self.fatal else WorkerError)(message)


def _serve(env: ManiSkillEnv, command: str, payload: Any) -> Any:
    """The answer of a worker holding ``env`` to one command."""
    if command == "reset":
        return env.reset(seed=payload)[0]
    if command == "step":
        obs, reward, terminated, truncated, info = env.step(payload)
        return obs, reward, terminated, truncated, info.get("is_success", False)
    if command == "spaces":
        return env.action_space, env.observation_space
    if command == "render":
        return env.render()
    if command == "call":
        name, args, kwargs = payload
        return env.env.get_wrapper_attr(name)(*args, **kwargs)
    if command == "get_attr":
        return env.env.get_wrapper_attr(payload)
    if command == "set_attr":
        return env.env.set_wrapper_attr(*payload)
    raise NotImplementedError(f"unknown command {command!r}")


def _worker(remote: Connection, parent: Connection, make_env: CloudpickleWrapper) -> None:
    """Holds one CPU-simulated env and answers (command, payload) messages with numpy results; a failed command
    is answered with its exception and the worker serves on, a failure to build the env ends it."""
    parent.close()
    env = None
    try:
        env = make_env.var()
        while True:
            command, payload = remote.recv()
            if command == "close":
                break
            try:
                answer = _serve(env, command, payload)
            except Exception as error:
                answer = _Failure(error, fatal=False)
            remote.send(answer)
    except KeyboardInterrupt:
        pass
    except BaseException as error:
        try:
            remote.send(_Failure(error, fatal=True))
        except (BrokenPipeError, EOFError):
            pass
    finally:
        if env is not None:
            env.close()
        remote.close()


class _CpuBatch(_Batch):
    """``num_envs`` CPU-simulated ManiSkill envs, one per subprocess; observations arrive as numpy."""

    def __init__(self, make_env: Callable[[], ManiSkillEnv], num_envs: int, start_method: Optional[str] = None) -> None:
        # forkserver (SB3's default too): the workers start clean, whatever this process has imported
        context = mp.get_context(start_method or "forkserver")
        self.num_envs, self.device = num_envs, th.device("cpu")
        self.remotes, self.processes = [], []
        for _ in range(num_envs):
            remote, work_remote = context.Pipe()
            process = context.Process(target=_worker, daemon=True, args=(
                work_remote, remote, CloudpickleWrapper(make_env)))
            process.start()
            work_remote.close()
            self.remotes.append(remote)
            self.processes.append(process)
        self.action_space, self.observation_space = self._ask([0], "spaces", None)[0]

    def _ask(self, indices: Sequence[int], command: str, payloads: Any) -> List[Any]:
        """Send ``command`` to the workers ``indices`` (``payloads``: a list, one each, or one for all) and
        return their answers; every answer is read before a failure is raised, so the pipes stay in step."""
        for position, index in enumerate(indices):
            payload = payloads[position] if isinstance(payloads, list) else payloads
            self.remotes[index].send((command, payload))
        answers = []
        for index in indices:
            try:
                answers.append(self.remotes[index].recv())
            except (EOFError, OSError):  # the worker died (an import error in a forkserver child included)
                self.processes[index].join(timeout=5)
                answers.append(_Failure(EOFError(f"died (exit code {self.processes[index].exitcode})"), fatal=True))
        for index, answer in zip(indices, answers):
            if isinstance(answer, _Failure):
                answer.raise_in_parent(index)
        return answers

    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[np.ndarray]) -> TorchObs:
        indices = list(range(self.num_envs)) if env_idx is None else [int(i) for i in env_idx]
        seed_list = [None if seeds is None else seeds[i] for i in indices]
        observations = self._ask(indices, "reset", seed_list)
        return _stack(observations)

    def step(self, actions: np.ndarray) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        answers = self._ask(range(self.num_envs), "step", list(np.asarray(actions)))
        obs, reward, terminated, truncated, success = zip(*answers)
        return (_stack(list(obs)), th.tensor(reward, dtype=th.float32), th.tensor(terminated), th.tensor(truncated),
                th.tensor(success))

    def render(self) -> List[np.ndarray]:
        return self._ask(range(self.num_envs), "render", None)

    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        return self._ask(indices, "call", (name, args, kwargs))

    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        return self._ask(indices, "get_attr", name)

    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        self._ask(indices, "set_attr", (name, value))

    def close(self) -> None:
        for remote in self.remotes:
            try:
                remote.send(("close", None))
            except (BrokenPipeError, EOFError):
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def _stack(rows: List[Any]) -> TorchObs:
    """Numpy observations of single envs as one batch of tensors."""
    if isinstance(rows[0], dict):
        return {key: th.as_tensor(np.stack([row[key] for row in rows])) for key in rows[0]}
    return th.as_tensor(np.stack(rows))


class ManiSkillVecEnv(VecEnv):
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
    :param device_observations: with GPU simulation, return observations as torch tensors on the simulator's
        device (for :class:`~sb3_elmur.ElmurPPO`) instead of numpy arrays
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
        self._setup(batch, device_observations)
        if seed is not None:
            self.seed(seed)

    def _setup(self, batch: _Batch, device_observations: bool) -> None:
        self.batch, self.device_observations = batch, device_observations
        super().__init__(batch.num_envs, batch.observation_space, batch.action_space)  # reads render_mode
        self.device = batch.device
        self.episode_returns = th.zeros(batch.num_envs, device=self.device)
        self.episode_lengths = th.zeros(batch.num_envs, dtype=th.long, device=self.device)
        self.start_time = time.time()
        self._actions: Optional[np.ndarray] = None

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
        self.episode_returns += reward.to(self.device)
        self.episode_lengths += 1
        dones = (terminated | truncated).cpu().numpy()
        infos: List[Dict[str, Any]] = [{} for _ in range(self.num_envs)]
        done_idx = np.flatnonzero(dones)
        if len(done_idx):
            rows = th.as_tensor(done_idx, device=obs_device(obs))
            terminal = self._output(_rows(obs, rows))  # a copy: obs is overwritten below
            returns, lengths = self.episode_returns[done_idx].tolist(), self.episode_lengths[done_idx].tolist()
            ended = [flag[done_idx].tolist() for flag in (terminated, truncated, success)]
            elapsed = round(time.time() - self.start_time, 6)
            for position, env in enumerate(done_idx):
                infos[env] = {
                    "episode": {"r": returns[position], "l": lengths[position], "t": elapsed},
                    "is_success": ended[2][position],
                    "TimeLimit.truncated": ended[1][position] and not ended[0][position],
                    "terminal_observation": _rows(terminal, position),
                }
            self.episode_returns[done_idx] = 0
            self.episode_lengths[done_idx] = 0
            # SB3's auto-reset: only the done envs start a new episode, unseeded
            _set_rows(obs, rows, self.batch.reset(None, done_idx))
        return self._output(obs), reward.cpu().numpy(), dones, infos

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

    def env_is_wrapped(self, wrapper_class: Type[gym.Wrapper], indices: VecEnvIndices = None) -> List[bool]:
        return [False] * len(self._get_indices(indices))

    def _get_indices(self, indices: VecEnvIndices) -> List[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, (int, np.integer)):
            return [int(indices)]
        return [int(i) for i in indices]


def obs_device(obs: TorchObs) -> th.device:
    return next(iter(obs.values())).device if isinstance(obs, dict) else obs.device


# rl-zoo3's --gym-packages imports this module for the sb3_elmur/<task id> ids
if importlib.util.find_spec("mani_skill") is not None:
    register_maniskill_envs()
