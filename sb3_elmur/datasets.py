"""Offline data: episodes in memory or in Minari datasets, window sampling for recurrent behaviour cloning,
and dataset makers (T-Maze oracle demonstrations; episodes of any SB3 policy on any gymnasium env).

    python -m sb3_elmur.datasets tmaze --dataset-id tmaze/oracle-v0
    python -m sb3_elmur.datasets collect --algo RecurrentPPO --model model.zip --env CartPole-v1 \\
        --episodes 100 --dataset-id cartpole/ppo-v0
"""

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_elmur.envs import TMazeEnv, TMazeOracle

Observations = Union[np.ndarray, Dict[str, np.ndarray]]


@dataclass
class Episode:
    """One episode: the T observations at which the T actions were taken (a final observation, if any, is
    dropped), and the rewards.

    :param observations: [T, ...] array, or a dict of such arrays for Dict observation spaces
    :param actions: [T, ...] array
    :param rewards: [T] array (optional)
    """

    observations: Observations
    actions: np.ndarray
    rewards: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.actions)


def map_observations(observations: Observations, fn: Any) -> Observations:
    """Apply ``fn`` to an observation array, or to every array of a dict of them."""
    if isinstance(observations, dict):
        return {key: fn(value) for key, value in observations.items()}
    return fn(observations)


def _take(observations: Observations, index: Any) -> Observations:
    return map_observations(observations, lambda value: value[index])


def n_rows(observations: Observations) -> int:
    """Length of the first dimension of observations (an array or a dict of arrays)."""
    if isinstance(observations, dict):
        return min(len(v) for v in observations.values())
    return len(observations)


class EpisodeDataset:
    """A list of episodes for offline training, with checks and window sampling.

    :param episodes: :class:`Episode` objects or dicts with keys ``observations``, ``actions`` (``rewards``)
    """

    def __init__(self, episodes: Sequence[Union[Episode, Dict[str, Any]]]) -> None:
        self.episodes: List[Episode] = []
        for i, ep in enumerate(episodes):
            if isinstance(ep, dict):
                ep = Episode(ep["observations"], ep["actions"], ep.get("rewards"))
            actions = np.asarray(ep.actions)
            if len(actions) < 1:
                raise ValueError(f"episode {i} has no steps: every episode needs at least one action")
            n_obs = n_rows(ep.observations)
            if n_obs not in (len(actions), len(actions) + 1):
                raise ValueError(f"episode {i} has {n_obs} observations for {len(actions)} actions (need T or T + 1)")
            observations = _take(ep.observations, slice(0, len(actions)))
            if not isinstance(observations, dict):
                observations = np.asarray(observations)
            self.episodes.append(Episode(observations, actions, None if ep.rewards is None else np.asarray(ep.rewards)))
        if not self.episodes:
            raise ValueError("the dataset is empty: it holds no episodes")

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def n_steps(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    @classmethod
    def from_minari(cls, dataset: Any) -> "EpisodeDataset":
        """Read a Minari dataset (an id for ``minari.load_dataset``, or a loaded ``MinariDataset``)."""
        import minari

        if isinstance(dataset, str):
            dataset = minari.load_dataset(dataset)
        episodes = [Episode(ep.observations, ep.actions, ep.rewards) for ep in dataset.iterate_episodes()]
        return cls(episodes)

    def check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Raise a ValueError if an episode's observations or actions do not fit the env's spaces."""
        for i, ep in enumerate(self.episodes):
            obs = _take(ep.observations, 0)
            if isinstance(observation_space, spaces.Dict) != isinstance(obs, dict):
                raise ValueError(f"episode {i}: observations do not match the observation space {observation_space}")
            if not observation_space.contains(_cast(obs, observation_space)):
                raise ValueError(f"episode {i}: observation {obs!r} is not in the observation space {observation_space}")
            action = ep.actions[0]
            if not action_space.contains(_cast(action, action_space)):
                raise ValueError(f"episode {i}: action {action!r} is not in the action space {action_space}")

    def sample_windows(
        self, rng: np.random.Generator, batch_size: int, window: int, segment: int
    ) -> Tuple[Observations, np.ndarray, np.ndarray]:
        """Sample ``batch_size`` windows of ``window`` steps, zero-padded past the episode's end.

        A window starts at a segment boundary of its episode (step 0, ``segment``, 2 * ``segment``, ...) and
        as early as possible: an episode that fits in a window is always taken from its first step, since a
        window starts with a fresh memory and would otherwise miss what the episode showed before it.

        :return: observations [B, window, ...], actions [B, window, ...], mask [B, window] (1 on real steps)
        """
        starts_per_episode = np.array([max(len(ep) - window, 0) // segment + 1 for ep in self.episodes])
        choice = rng.choice(starts_per_episode.sum(), size=batch_size)
        episode_index = np.searchsorted(np.cumsum(starts_per_episode), choice, side="right")
        obs_batch, act_batch = [], []
        mask = np.zeros((batch_size, window), dtype=np.float32)
        for b, i in enumerate(episode_index):
            ep = self.episodes[i]
            start = segment * int(rng.integers(starts_per_episode[i]))
            stop = min(start + window, len(ep))
            mask[b, : stop - start] = 1.0
            obs_batch.append(_pad(_take(ep.observations, slice(start, stop)), window))
            act_batch.append(_pad(ep.actions[start:stop], window))
        if isinstance(obs_batch[0], dict):
            observations: Observations = {k: np.stack([o[k] for o in obs_batch]) for k in obs_batch[0]}
        else:
            observations = np.stack(obs_batch)
        return observations, np.stack(act_batch), mask

    def to_minari(self, dataset_id: str, env: Union[str, gym.Env], **metadata: Any) -> Any:
        """Write the episodes as a Minari dataset (needs ``minari[hdf5]``); the final observation of each
        episode is repeated since Minari stores T + 1 observations."""
        import minari
        from minari.data_collector.episode_buffer import EpisodeBuffer

        buffers = []
        for i, ep in enumerate(self.episodes):
            last = _take(ep.observations, slice(-1, None))
            obs = (
                {k: np.concatenate([v, last[k]]) for k, v in ep.observations.items()}
                if isinstance(ep.observations, dict)
                else np.concatenate([ep.observations, last])
            )
            rewards = ep.rewards if ep.rewards is not None else np.zeros(len(ep), dtype=np.float32)
            terminations = [False] * (len(ep) - 1) + [True]
            buffers.append(
                EpisodeBuffer(
                    id=i,
                    observations=obs,
                    actions=ep.actions,
                    rewards=list(map(float, rewards)),
                    terminations=terminations,
                    truncations=[False] * len(ep),
                    infos={},
                )
            )
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, **metadata)


def _cast(value: Any, space: spaces.Space) -> Any:
    if isinstance(space, spaces.Discrete):
        return int(np.asarray(value).item()) if np.asarray(value).size == 1 else value
    if isinstance(space, spaces.Dict):
        return {k: _cast(value[k], s) for k, s in space.spaces.items()} if isinstance(value, dict) else value
    if isinstance(space, spaces.Box):
        return np.asarray(value, dtype=space.dtype)
    return np.asarray(value, dtype=space.dtype)


def _pad(values: Observations, length: int) -> Observations:
    if isinstance(values, dict):
        return map_observations(values, lambda v: _pad(v, length))
    values = np.asarray(values)
    padding = np.zeros((length - len(values), *values.shape[1:]), dtype=values.dtype)
    return np.concatenate([values, padding])


def make_tmaze_dataset(
    n_episodes: int = 2000, min_corridor: int = 1, max_corridor: int = 28, seed: int = 0
) -> EpisodeDataset:
    """Oracle demonstrations on the reference T-Maze (the spec's protocol): corridor lengths uniform in
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
    deterministic)`` (a trained model, a recurrent one, or a scripted policy) on a gymnasium env."""
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Create Minari datasets for offline training.")
    sub = parser.add_subparsers(dest="command", required=True)
    tmaze = sub.add_parser("tmaze", help="T-Maze oracle demonstrations (reference protocol)")
    tmaze.add_argument("--dataset-id", required=True)
    tmaze.add_argument("--episodes", type=int, default=2000)
    tmaze.add_argument("--max-corridor", type=int, default=28)
    tmaze.add_argument("--seed", type=int, default=0)
    collect = sub.add_parser("collect", help="episodes of a saved SB3 model on a gymnasium env")
    collect.add_argument("--algo", default="RecurrentPPO", help="class name in sb3_contrib, stable_baselines3 or sb3_elmur")
    collect.add_argument("--model", required=True, help="path of the saved model (.zip)")
    collect.add_argument("--env", required=True, help="gymnasium env id")
    collect.add_argument("--env-kwargs", default="{}", help="JSON dict of env keyword arguments")
    collect.add_argument("--episodes", type=int, default=100)
    collect.add_argument("--dataset-id", required=True)
    collect.add_argument("--stochastic", action="store_true", help="sample actions instead of acting greedily")
    collect.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "tmaze":
        dataset = make_tmaze_dataset(args.episodes, max_corridor=args.max_corridor, seed=args.seed)
        dataset.to_minari(args.dataset_id, env=gym.make("sb3_elmur/TMaze-v0"), algorithm_name="T-Maze oracle")
    else:
        import json

        from sb3_elmur.utils import load_algorithm

        model = load_algorithm(args.algo, args.model)
        env = gym.make(args.env, **json.loads(args.env_kwargs))
        dataset = collect_episodes(model, env, args.episodes, deterministic=not args.stochastic, seed=args.seed)
        dataset.to_minari(args.dataset_id, env=env, algorithm_name=args.algo)
    print(f"wrote {args.dataset_id}: {len(dataset)} episodes, {dataset.n_steps} steps")


if __name__ == "__main__":
    main()
