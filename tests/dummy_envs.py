"""Small environments for policy tests: random observations, episodes of random length."""

from typing import Any, Dict, Optional, Tuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class RandomLengthEnv(gym.Env):
    """Random observations and rewards; each episode lasts a random number of steps in [min_len, max_len].

    :param action_space: any action space
    :param observation_space: Box (vector or image) or Dict observation space
    """

    def __init__(
        self,
        action_space: spaces.Space,
        observation_space: Optional[spaces.Space] = None,
        min_len: int = 3,
        max_len: int = 40,
    ) -> None:
        super().__init__()
        self.action_space = action_space
        self.observation_space = observation_space or spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
        self.min_len, self.max_len = min_len, max_len
        self._left = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict]:
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self._left = int(self.np_random.integers(self.min_len, self.max_len + 1))
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> Tuple[Any, float, bool, bool, Dict]:
        self._left -= 1
        reward = float(self.np_random.normal())
        terminated = self._left <= 0 and self.np_random.random() < 0.5
        truncated = self._left <= 0 and not terminated
        return self.observation_space.sample(), reward, terminated, truncated, {}


class NonFiniteStepEnv(RandomLengthEnv):
    """A :class:`RandomLengthEnv` (Discrete(2) actions) whose 5th step puts ``bad`` (NaN or inf) into its
    observation (at index 1) or its reward, as a broken env would.

    :param bad: the non-finite value
    :param into: "observation" or "reward"
    """

    def __init__(self, bad: float, into: str) -> None:
        super().__init__(spaces.Discrete(2))
        assert into in ("observation", "reward"), into
        self.bad, self.into, self.n_steps = bad, into, 0

    def step(self, action: Any) -> Tuple[Any, float, bool, bool, Dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        self.n_steps += 1
        if self.n_steps == 5 and self.into == "observation":
            obs = obs.copy()
            obs[1] = self.bad
        if self.n_steps == 5 and self.into == "reward":
            reward = self.bad
        return obs, reward, terminated, truncated, info
