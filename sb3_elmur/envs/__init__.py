from typing import Optional

import gymnasium as gym

from sb3_elmur.envs.recall import NoisyRecallEnv, NoisyRecallVecEnv, RecallOracle
from sb3_elmur.envs.tmaze import TMazeEnv, TMazeOracle, TMazeVecEnv

# id -> default kwargs
_ENV_IDS = {
    "sb3_elmur/TMaze-v0": {"variant": "reference"},
    "sb3_elmur/PassiveTMaze-v0": {"variant": "passive"},
}


def register_envs() -> None:
    """
    Register the T-Maze environments with gymnasium (safe to call several times).

    ``gym.make("sb3_elmur/TMaze-v0", corridor_length=100)`` then creates a
    :class:`TMazeEnv`. No ``max_episode_steps`` is given: the env truncates itself
    since its time limit depends on ``corridor_length``.
    """
    for env_id, kwargs in _ENV_IDS.items():
        # Re-registering an id makes gymnasium warn, so skip known ids
        if env_id in gym.registry:
            continue
        gym.register(id=env_id, entry_point="sb3_elmur.envs.tmaze:TMazeEnv", kwargs=dict(kwargs))
    if "sb3_elmur/NoisyRecall-v0" not in gym.registry:
        gym.register(id="sb3_elmur/NoisyRecall-v0", entry_point="sb3_elmur.envs.recall:NoisyRecallEnv")


# MIKASA-Robo's task families (mikasa-robo-suite 1.0.0); a task id is the family name, a variant and "-v0".
# Longest first, so that RememberShapeAndColor is not taken for RememberShape.
MIKASA_FAMILIES = ("RememberShapeAndColor", "RememberShape", "RememberColor", "BunchOfColors", "SeqOfColors",
                   "ChainOfColors", "ShellGame", "Intercept", "TakeItBack", "Rotate")


def mikasa_family(env_id: str) -> Optional[str]:
    """The MIKASA-Robo family of ``env_id`` (None for other ids); imports nothing, so it is cheap to ask."""
    return next((family for family in MIKASA_FAMILIES if env_id.startswith(family)), None)


__all__ = [
    "MIKASA_FAMILIES", "NoisyRecallEnv", "NoisyRecallVecEnv", "RecallOracle", "TMazeEnv", "TMazeOracle", "TMazeVecEnv",
    "mikasa_family", "register_envs",
]
