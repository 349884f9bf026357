"""ManiSkill 3 and MIKASA-Robo tasks as an SB3 ``VecEnv``.

:class:`ManiSkillVecEnv` runs ``n_envs`` copies of a ManiSkill task behind SB3's ``VecEnv`` interface. With a CUDA
device it is one GPU-simulated ManiSkill env with ``num_envs=n_envs`` (partial resets of the done envs); without
one, ``n_envs`` CPU-simulated envs in subprocesses (ManiSkill's CPU backend holds one env per process). Both share
everything above the simulator: observations in SB3 layouts, per-episode statistics as ``VecMonitor`` gives them,
``is_success``, time-limit truncation and terminal observations.

``import sb3_elmur`` does not import this package, so it stays light; importing it imports ManiSkill (where it is
installed) and registers every task as ``sb3_elmur/<task id>``, a single :class:`ManiSkillEnv` (rl-zoo3's
``--gym-packages sb3_elmur.envs.maniskill``). ManiSkill needs a Vulkan device: on a machine without a GPU, install a
CPU one once with ``python -m sb3_elmur.envs.vulkan install``; this package activates it in every process. SAPIEN's and
ManiSkill's warnings about the fallbacks this involves (SAPIEN's own Vulkan loader, rendering on the CPU), which they
print in every process, are hidden: the main process says once, in one line, what is used.

Modules: ``loading`` (importing ManiSkill with Vulkan, quietly), ``tasks`` (task ids, assets, registration),
``observations`` (SB3 layouts), ``mikasa`` (MIKASA-Robo's wrappers and two fixes), ``env`` (one task as a gymnasium
env), ``batch`` (the simulator interface, GPU backend), ``worker`` (CPU backend: subprocesses and their protocol),
``vec_env`` (:class:`ManiSkillVecEnv`).
"""

import importlib.util

from sb3_elmur.envs.maniskill.batch import _Batch
from sb3_elmur.envs.maniskill.env import ManiSkillEnv, make_maniskill_env
from sb3_elmur.envs.maniskill.mikasa import _MIKASA_RENDER_WRAPPERS
from sb3_elmur.envs.maniskill.observations import (
    OBS_MODES,
    PRIVILEGED_KEYS,
    TorchObs,
    convert_observation,
    obs_device,
    observation_space,
)
from sb3_elmur.envs.maniskill.tasks import MissingAssetsError, check_task, mikasa_env_ids, register_maniskill_envs
from sb3_elmur.envs.maniskill.vec_env import ManiSkillVecEnv
from sb3_elmur.envs.maniskill.worker import WorkerError

# (_Batch and _MIKASA_RENDER_WRAPPERS: imported from here by the tests, as when this package was one module)
__all__ = [
    "OBS_MODES", "PRIVILEGED_KEYS", "ManiSkillEnv", "ManiSkillVecEnv", "MissingAssetsError", "TorchObs", "WorkerError",
    "_Batch", "_MIKASA_RENDER_WRAPPERS", "check_task", "convert_observation", "make_maniskill_env", "mikasa_env_ids",
    "obs_device", "observation_space", "register_maniskill_envs",
]

# rl-zoo3's --gym-packages imports this package for the sb3_elmur/<task id> ids
if importlib.util.find_spec("mani_skill") is not None:
    register_maniskill_envs()
