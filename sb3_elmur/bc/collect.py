"""Dataset makers: oracle demonstrations of T-Maze and noisy recall, and episodes of any SB3 policy on any env."""

from typing import Any, Optional

import gymnasium as gym
import numpy as np

from sb3_elmur.bc.datasets import Episode, EpisodeDataset, Observations
from sb3_elmur.common.checks import check_int
from sb3_elmur.common.evaluation import check_model_spaces
from sb3_elmur.envs import TMazeEnv, TMazeOracle
from sb3_elmur.envs.recall import Length, _RecallEpisodes


def make_tmaze_dataset(
    n_episodes: int = 2000, min_corridor: int = 1, max_corridor: int = 28, seed: int = 0
) -> EpisodeDataset:
    """Oracle demonstrations on the reference T-Maze (the paper's protocol, docs/model.md): corridor lengths uniform in
    [min_corridor, max_corridor], cues alternating +1/-1, one oracle episode each (L + 1 steps, reward 1)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        env = TMazeEnv(corridor_length=int(rng.integers(min_corridor, max_corridor + 1)), variant="reference")
        oracle = TMazeOracle(1)
        obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"cue": 1 if i % 2 == 0 else -1})
        observations, actions, rewards = [obs], [], []
        start, done = True, False
        while not done:
            action = int(oracle.act(obs[None], np.array([start]))[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            actions.append(action)
            rewards.append(reward)
            observations.append(obs)
            start, done = False, terminated or truncated
        episodes.append(Episode(np.array(observations), np.array(actions), np.array(rewards, dtype=np.float32)))
    return EpisodeDataset(episodes)


def collect_episodes(
    model: Any, env: gym.Env, n_episodes: int, deterministic: bool = True, seed: Optional[int] = 0
) -> EpisodeDataset:
    """Record ``n_episodes`` episodes of any object with SB3's ``predict(obs, state, episode_start,
    deterministic)`` (a trained model, a recurrent one, or a scripted policy) on a gymnasium env.

    :raise ValueError: if ``model`` has spaces (a SB3 model or policy) other than the env's: naming both
    """
    name = getattr(env.spec, "id", None) or type(env.unwrapped).__name__
    check_model_spaces(model, env.observation_space, env.action_space, f"the env {name}")
    episodes = []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=None if seed is None else seed + i)
        observations, actions, rewards = [obs], [], []
        state, start, done = None, np.ones(1, dtype=bool), False
        while not done:
            batched = {k: v[None] for k, v in obs.items()} if isinstance(obs, dict) else np.asarray(obs)[None]
            action, state = model.predict(batched, state=state, episode_start=start, deterministic=deterministic)
            action = action[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            start, done = np.zeros(1, dtype=bool), terminated or truncated
        if isinstance(observations[0], dict):
            stacked: Observations = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
        else:
            stacked = np.stack(observations)
        episodes.append(Episode(stacked, np.stack(actions), np.array(rewards, dtype=np.float32)))
    return EpisodeDataset(episodes)


def make_recall_dataset(n_episodes: int = 2000, n_cues: int = 3, length: Length = (30, 100), noise_dims: int = 4,
                        noise_std: float = 1.0, wait: bool = False, seed: int = 0) -> Any:
    """Oracle episodes of the noisy recall task (see :class:`NoisyRecallEnv` for the parameters), for ``RecurrentBC``.

    :return: an :class:`~sb3_elmur.datasets.EpisodeDataset` of ``n_episodes`` episodes
    """
    from sb3_elmur.bc.datasets import Episode, EpisodeDataset

    episodes = _RecallEpisodes(check_int("n_episodes", n_episodes), n_cues, length, noise_dims, noise_std, wait, seed)
    first = episodes.reset(np.arange(n_episodes))
    observations, actions = [first], []
    for _ in range(int(episodes.length.max())):
        actions.append(episodes.expert_actions())
        obs, _, _, _ = episodes.step(actions[-1])
        observations.append(obs)
    observations, actions = np.stack(observations, axis=1), np.stack(actions, axis=1)  # [E, T_max + 1, D], [E, T_max]
    return EpisodeDataset([
        Episode(observations[e, :n], actions[e, :n], rewards=(np.arange(n) == n - 1).astype(np.float32))
        for e, n in enumerate(episodes.length)
    ])
