"""Batched T-Maze evaluation: success rate of a policy over many episodes at once."""

from typing import Optional

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_elmur.envs import TMazeVecEnv


def evaluate_tmaze(
    model: BaseAlgorithm,
    corridor_length: int,
    n_episodes: int = 100,
    variant: str = "passive",
    deterministic: bool = True,
    seed: Optional[int] = 0,
    progress_bar: bool = False,
) -> float:
    """Success rate of ``model`` on ``n_episodes`` T-Maze episodes, half with each cue, run as one batch.

    Works with any model that has ``predict(obs, state, episode_start, deterministic)``, recurrent or not.

    :param model: trained model (RecurrentPPO, PPO, ...)
    :param corridor_length: corridor length L (episodes last at most L + 2 steps)
    :param n_episodes: number of episodes (one per env of the batch)
    :param variant: "passive" or "reference" (success is the same: reaching the cued goal)
    :param deterministic: act greedily
    :param seed: seed of the observation noise
    :param progress_bar: show a tqdm progress bar over steps (long corridors)
    :return: fraction of episodes that reached the correct goal
    """
    cues = np.where(np.arange(n_episodes) < (n_episodes + 1) // 2, 1, -1)
    env = TMazeVecEnv(n_episodes, corridor_length=corridor_length, variant=variant, seed=seed, cues=cues)
    obs = env.reset()
    state = None
    episode_start = np.ones(n_episodes, dtype=bool)
    success = np.zeros(n_episodes, dtype=bool)
    finished = np.zeros(n_episodes, dtype=bool)
    steps = range(env.time_limit)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"T-Maze L={corridor_length}")
    for _ in steps:
        actions, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
        obs, _, dones, infos = env.step(actions)
        for i in np.flatnonzero(dones & ~finished):
            success[i] = infos[i]["is_success"]
        finished |= dones
        episode_start = dones
        if finished.all():
            break
    env.close()
    return float(success.mean())
