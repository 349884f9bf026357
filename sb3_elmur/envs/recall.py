"""Noisy recall: see one of ``n_cues`` cues at the first step, then only noise, and name the cue at the end.

Unlike T-Maze, whose corridor observations are constant (a recurrence that settles to a fixed point keeps the
cue for ever), every step here brings fresh noise, so a memory has to hold the cue against it: the task separates
memories that keep what they stored from those that drift (the length-generalization benchmark of offline RL).

Two forms of the task, by what the expert does before the query: it names the cue at every step (``wait=False``:
behaviour cloning supervises holding the cue all along), or it waits (``wait=True``, an extra action) and names the
cue at the query step only: T-Maze's structure (walk, then turn once) with a noisy corridor, where the only
supervision of the memory comes at the end of the episode.

- :class:`NoisyRecallVecEnv`: ``n_envs`` episodes, numpy-vectorized (evaluations at 10^5 steps and more)
- :class:`NoisyRecallEnv`: one episode, a plain ``gymnasium.Env`` (``sb3_elmur/NoisyRecall-v0``)
- :class:`RecallOracle` and :func:`make_recall_dataset`: the expert and its episodes, for ``RecurrentBC``
"""

from typing import Any, Dict, Optional, Tuple, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from sb3_elmur.common.checks import check_bool, check_int
from sb3_elmur.common.vec_env import BatchedVecEnv

Length = Union[int, Tuple[int, int]]


def _check_length(length: Any) -> Tuple[int, int]:
    low, high = (length, length) if not isinstance(length, (tuple, list)) else tuple(length)
    low, high = check_int("length", low), check_int("length", high)
    if low > high:
        raise ValueError(f"length range {length!r} is empty: (low, high) with low <= high")
    return low, high


class _RecallEpisodes:
    """The task's state and rules for ``n`` episodes side by side (one implementation for both env classes)."""

    def __init__(self, n: int, n_cues: int, length: Length, noise_dims: int, noise_std: float, wait: bool,
                 seed: Optional[int]):
        self.n, self.n_cues, self.noise_dims, self.noise_std = n, check_int("n_cues", n_cues, 2), noise_dims, noise_std
        self.wait = check_bool("wait", wait)
        self.low, self.high = _check_length(length)
        self.rng = np.random.default_rng(seed)
        self.cue = np.zeros(n, dtype=np.int64)
        self.length = np.zeros(n, dtype=np.int64)
        self.t = np.zeros(n, dtype=np.int64)

    @property
    def obs_dim(self) -> int:
        return self.n_cues + 1 + self.noise_dims

    def observations(self, rows: np.ndarray) -> np.ndarray:
        """[cue one-hot (first step only), query flag (last step only), noise] of ``rows``."""
        obs = np.zeros((len(rows), self.obs_dim), dtype=np.float32)
        first = self.t[rows] == 0
        obs[np.flatnonzero(first), self.cue[rows][first]] = 1.0
        obs[:, self.n_cues] = self.t[rows] == self.length[rows] - 1
        obs[:, self.n_cues + 1:] = self.rng.normal(0.0, self.noise_std, (len(rows), self.noise_dims))
        return obs

    def reset(self, rows: np.ndarray) -> np.ndarray:
        self.cue[rows] = self.rng.integers(self.n_cues, size=len(rows))
        self.length[rows] = self.rng.integers(self.low, self.high + 1, size=len(rows))
        self.t[rows] = 0
        return self.observations(rows)

    def expert_actions(self) -> np.ndarray:
        """The expert's actions at the current step: the cue, or (``wait``) the wait action before the query."""
        if not self.wait:
            return self.cue.copy()
        return np.where(self.t == self.length - 1, self.cue, self.n_cues)

    def step(self, actions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Observations, rewards, ``done`` and ``success`` flags after ``actions``; the answer counts at the last
        step only (the one whose observation carries the query flag), other steps' actions change nothing."""
        last = self.t == self.length - 1
        success = last & (np.asarray(actions).reshape(self.n) == self.cue)
        self.t += 1
        return self.observations(np.arange(self.n)), success.astype(np.float32), last, success


def _spaces(episodes: _RecallEpisodes) -> Tuple[spaces.Box, spaces.Discrete]:
    return spaces.Box(-np.inf, np.inf, (episodes.obs_dim,), np.float32), spaces.Discrete(episodes.n_cues + episodes.wait)


class NoisyRecallEnv(gym.Env):
    """Noisy recall, one episode at a time.

    Observation (float32): the cue as a one-hot vector of ``n_cues`` entries at the first step (zeros after), a
    query flag at the last step, and ``noise_dims`` entries of Gaussian noise at every step. Actions: ``n_cues``
    answers (and, with ``wait``, the wait action ``n_cues``); the one taken at the query step ends the episode,
    with reward 1 and ``info["is_success"]`` if it names the cue.

    :param n_cues: number of cues (>= 2)
    :param length: episode length in steps, or a range ``(low, high)`` drawn per episode
    :param noise_dims: noise entries per observation
    :param noise_std: their standard deviation
    :param wait: add a wait action, the expert's action before the query (see the module's docstring)
    """

    metadata = {"render_modes": []}

    def __init__(self, n_cues: int = 3, length: Length = 30, noise_dims: int = 4, noise_std: float = 1.0,
                 wait: bool = False) -> None:
        super().__init__()
        self.episodes = _RecallEpisodes(1, n_cues, length, check_int("noise_dims", noise_dims, 0), noise_std, wait, None)
        self.observation_space, self.action_space = _spaces(self.episodes)

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, Dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.episodes.rng = np.random.default_rng(seed)
        return self.episodes.reset(np.arange(1))[0], {}

    def step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}: expected one of 0..{self.action_space.n - 1}")
        obs, reward, done, success = self.episodes.step(np.array([action]))
        return obs[0], float(reward[0]), bool(done[0]), False, {"is_success": bool(success[0])} if done[0] else {}


class NoisyRecallVecEnv(BatchedVecEnv):
    """``n_envs`` noisy recall episodes, numpy-vectorized (see :class:`NoisyRecallEnv`); done envs start a new
    episode at once (SB3's auto-reset), ``info["terminal_observation"]`` and ``info["is_success"]`` on their last
    step. Episode statistics: wrap in SB3's ``VecMonitor``.

    :param n_envs: number of envs
    :param seed: seed of the episodes (cues, lengths and noise)
    (other parameters: see :class:`NoisyRecallEnv`)
    """

    def __init__(self, n_envs: int = 1, n_cues: int = 3, length: Length = 30, noise_dims: int = 4,
                 noise_std: float = 1.0, wait: bool = False, seed: Optional[int] = None) -> None:
        self.episodes = _RecallEpisodes(check_int("n_envs", n_envs), n_cues, length, check_int("noise_dims", noise_dims, 0),
                                        noise_std, wait, seed)
        super().__init__(n_envs, *_spaces(self.episodes), seed=seed)
        self._actions = np.zeros(n_envs, dtype=np.int64)

    def reset(self) -> np.ndarray:
        if self._seeds[0] is not None:
            self.episodes.rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        return self.episodes.reset(np.arange(self.num_envs))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, success = self.episodes.step(self._actions)
        done_rows = np.flatnonzero(dones)
        infos = self._step_infos(done_rows, obs[done_rows], success[done_rows].tolist(), [False] * len(done_rows))
        if len(done_rows):
            obs[done_rows] = self.episodes.reset(done_rows)
        return obs, rewards, dones, infos


class RecallOracle:
    """The expert: names the cue at every step (or, with ``wait``, at the query step and waits before),
    remembering it from each episode's first observation. Works on batches, like a recurrent SB3 policy's
    ``predict``.

    :param n_cues: number of cues of the task
    :param wait: the task's ``wait`` option
    """

    def __init__(self, n_cues: int = 3, wait: bool = False) -> None:
        self.n_cues, self.wait = n_cues, wait

    def predict(self, observation: np.ndarray, state: Optional[np.ndarray] = None,
                episode_start: Optional[np.ndarray] = None, deterministic: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        cue_seen = observation[:, : self.n_cues].max(axis=1) > 0.5
        cue = observation[:, : self.n_cues].argmax(axis=1)
        state = np.where(cue_seen, cue, -1 if state is None else state)
        answer = np.maximum(state, 0)
        if self.wait:
            answer = np.where(observation[:, self.n_cues] > 0.5, answer, self.n_cues)
        return answer, state
