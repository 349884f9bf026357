"""MIKASA-Robo's tasks as its own baselines run them: the suite's wrappers by task family, and two of ours for
RememberColor (the cubes that CPU simulation leaves hidden, and the cubes as the cameras show them)."""

from typing import Any, Dict, Optional, Tuple

import gymnasium as gym
import torch as th

from sb3_elmur.envs import mikasa_family

# MIKASA-Robo's own wrappers by task family (the suite's PPO baselines apply the same), after the one that adds
# ``task_cue`` and ``oracle_info`` to the observations. They only write step, reward and task facts onto rendered frames
# (videos), so they are applied only when rendering: each reads ``elapsed_steps`` back to the host at every step (on a
# GPU, a wait for the device). Their zero-action wrapper is left out: at the baselines' default it does nothing.
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


def _wrap_mikasa(env: gym.Env, env_id: str, sim_backend: str, obs_mode: str, render_mode: Optional[str] = None) -> gym.Env:
    """The MIKASA-Robo task ``env`` (of ``env_id``) with the suite's wrappers, and ours where they are needed.

    :param env: ``gym.make`` of the task
    :param env_id: its task id
    :param sim_backend: ``"gpu"`` or ``"cpu"``
    :param obs_mode: one of :data:`~sb3_elmur.envs.maniskill.OBS_MODES`
    :param render_mode: the env's render mode: the suite's render wrappers only with one
    """
    from mikasa_robo_suite.rl.utils import wrappers

    if sim_backend == "cpu" and mikasa_family(env_id) == "RememberColor":
        env = _CubesReturnOnCpu(env)
    env = wrappers.StateOnlyTensorToDictWrapper(env)
    if obs_mode == "memory_state":
        env = _CubesAsSeen(env)
    for name in _MIKASA_RENDER_WRAPPERS[mikasa_family(env_id)] if render_mode is not None else ():
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
