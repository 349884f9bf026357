"""Observation wrappers that make any POPGym environment (and other discrete-observation envs) usable by SB3.

- :class:`FlattenObservationWrapper`: turns Tuple, Dict, Discrete, MultiDiscrete (any shape) and MultiBinary
  observations into one flat float32 vector, discrete parts one-hot encoded.
- :class:`PreviousActionWrapper`: appends an encoding of the previous action to a flat observation (the
  POPGym baselines' convention), zeros at the start of an episode.

Both are plain ``gymnasium`` wrappers: they work on ``gym.make`` results (with gymnasium's own wrappers around the
env), inside ``make_vec_env(wrapper_class=...)`` and in rl-zoo3's ``env_wrapper`` list.
:func:`make_popgym_env` builds a POPGym environment with both.
"""

import difflib
import importlib.util
from typing import Any, Dict, List, Optional, SupportsFloat, Tuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

POPGYM_PREFIX = "popgym-"
POPGYM_LEVELS = ("Easy", "Medium", "Hard")


def _unsupported(space: spaces.Space, what: str) -> ValueError:
    return ValueError(
        f"cannot encode the {what} space {space} as a flat vector: only Box, Discrete, MultiDiscrete, "
        "MultiBinary and Tuple / Dict of those are supported"
    )


def _check_encodable(space: spaces.Space, what: str) -> None:
    """Raise a ValueError naming the first sub-space that cannot be encoded as a fixed-size vector."""
    if isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return
    if isinstance(space, spaces.Tuple):
        for sub_space in space.spaces:
            _check_encodable(sub_space, what)
        return
    if isinstance(space, spaces.Dict):
        for sub_space in space.spaces.values():
            _check_encodable(sub_space, what)
        return
    raise _unsupported(space, what)


def encoded_bounds(space: spaces.Space) -> Tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (float32 vectors) of the encoding of ``space`` made by :func:`encode`.

    :param space: a Box, Discrete, MultiDiscrete, MultiBinary, or Tuple / Dict of those
    :return: (low, high), each of shape ``(encoded_size(space),)``
    """
    if isinstance(space, spaces.Box):
        return space.low.astype(np.float32).reshape(-1), space.high.astype(np.float32).reshape(-1)
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        size = encoded_size(space)
        return np.zeros(size, dtype=np.float32), np.ones(size, dtype=np.float32)
    if isinstance(space, (spaces.Tuple, spaces.Dict)):
        children = space.spaces if isinstance(space, spaces.Tuple) else list(space.spaces.values())
        bounds = [encoded_bounds(sub_space) for sub_space in children]
        return (
            np.concatenate([low for low, _ in bounds]).astype(np.float32),
            np.concatenate([high for _, high in bounds]).astype(np.float32),
        )
    raise _unsupported(space, "given")


def encoded_size(space: spaces.Space) -> int:
    """Length of the flat vector :func:`encode` makes for ``space``.

    :param space: a Box, Discrete, MultiDiscrete, MultiBinary, or Tuple / Dict of those
    """
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(space.nvec.sum())
    if isinstance(space, spaces.MultiBinary):
        return int(np.prod(space.shape))
    if isinstance(space, spaces.Tuple):
        return sum(encoded_size(sub_space) for sub_space in space.spaces)
    if isinstance(space, spaces.Dict):
        return sum(encoded_size(sub_space) for sub_space in space.spaces.values())
    raise _unsupported(space, "given")


def encode(space: spaces.Space, value: Any) -> np.ndarray:
    """Encode one element of ``space`` as a flat float32 vector.

    Box and MultiBinary values are flattened as they are; Discrete values become one-hot vectors and
    MultiDiscrete values (of any shape) the concatenation of one one-hot vector per entry; Tuple and Dict
    values the concatenation of their parts' encodings (Dict in the space's key order).

    :param space: the space ``value`` belongs to
    :param value: the element
    :return: float32 vector of length ``encoded_size(space)``
    """
    if isinstance(space, (spaces.Box, spaces.MultiBinary)):
        flat = np.asarray(value, dtype=np.float32).reshape(-1)
        if flat.shape[0] != encoded_size(space):
            raise ValueError(f"value of shape {np.shape(value)} does not belong to {space}")
        return flat
    if isinstance(space, spaces.Discrete):
        index = int(np.asarray(value).item()) - int(space.start)
        if not 0 <= index < space.n:
            raise ValueError(f"value {value!r} does not belong to {space}")
        one_hot = np.zeros(int(space.n), dtype=np.float32)
        one_hot[index] = 1.0
        return one_hot
    if isinstance(space, spaces.MultiDiscrete):
        nvec = space.nvec.reshape(-1)
        values = np.asarray(value).reshape(-1)
        if values.shape != nvec.shape:
            raise ValueError(f"value of shape {np.shape(value)} does not belong to {space}")
        index = values - space.start.reshape(-1)
        if np.any(index < 0) or np.any(index >= nvec):
            raise ValueError(f"value {value!r} does not belong to {space}")
        one_hot = np.zeros(int(nvec.sum()), dtype=np.float32)
        # Each entry's one-hot block starts where the previous entries' blocks end.
        offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
        one_hot[offsets + index] = 1.0
        return one_hot
    if isinstance(space, spaces.Tuple):
        if len(value) != len(space.spaces):
            raise ValueError(f"value with {len(value)} parts does not belong to {space}")
        return np.concatenate([encode(sub_space, part) for sub_space, part in zip(space.spaces, value)])
    if isinstance(space, spaces.Dict):
        return np.concatenate([encode(sub_space, value[key]) for key, sub_space in space.spaces.items()])
    raise _unsupported(space, "given")


class FlattenObservationWrapper(gym.ObservationWrapper):
    """Flatten any Box / Discrete / MultiDiscrete / MultiBinary / Tuple / Dict observation to a float32 vector.

    Discrete parts are one-hot encoded (see :func:`encode`). Unlike ``gymnasium.wrappers.FlattenObservation``,
    the result is always float32 (a one-hot Box of int64 would be read by SB3 as a Box of counts, and its
    feature size reaches ``nn.LSTM`` as ``np.int64``, which torch rejects) and unsupported spaces raise a
    ValueError at construction.

    :param env: environment to wrap
    """

    def __init__(self, env: gym.Env) -> None:
        _check_encodable(env.observation_space, "observation")
        super().__init__(env)
        low, high = encoded_bounds(env.observation_space)
        self.observation_space = spaces.Box(low=low, high=high, dtype=np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        return encode(self.env.observation_space, observation)


class PreviousActionWrapper(gym.Wrapper):
    """Append an encoding of the previous action to a flat observation, as the POPGym baselines do.

    Discrete and MultiDiscrete actions are one-hot encoded, Box and MultiBinary actions appended as they are.
    The first observation of an episode carries zeros in place of the previous action (no one-hot vector is
    all zeros, so "no action yet" is told apart from every action).

    :param env: environment with a 1-D Box observation space (wrap it in :class:`FlattenObservationWrapper`
        first if it has another one)
    """

    def __init__(self, env: gym.Env) -> None:
        obs_space = env.observation_space
        if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(
                f"PreviousActionWrapper needs a 1-D Box observation space, got {obs_space}: "
                "wrap the env in FlattenObservationWrapper first"
            )
        _check_encodable(env.action_space, "action")
        super().__init__(env)
        action_low, action_high = encoded_bounds(env.action_space)
        self.action_size = action_low.shape[0]
        self.observation_space = spaces.Box(
            low=np.concatenate([obs_space.low.astype(np.float32), action_low]),
            high=np.concatenate([obs_space.high.astype(np.float32), action_high]),
            dtype=np.float32,
        )

    def _observation(self, observation: Any, action_encoding: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(observation, dtype=np.float32).reshape(-1), action_encoding])

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, Dict]:
        observation, info = self.env.reset(seed=seed, options=options)
        return self._observation(observation, np.zeros(self.action_size, dtype=np.float32)), info

    def step(self, action: Any) -> Tuple[np.ndarray, SupportsFloat, bool, bool, Dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._observation(observation, encode(self.env.action_space, action)), reward, terminated, truncated, info


def is_popgym_id(env_id: str) -> bool:
    """Whether ``env_id`` names a POPGym environment (``popgym-<Name><Level>-v<N>``)."""
    return env_id.startswith(POPGYM_PREFIX)


def popgym_env_ids() -> List[str]:
    """All POPGym ids registered by ``import popgym`` (48 with ``mazelib`` installed, 42 without), sorted."""
    _import_popgym()
    return sorted(env_id for env_id in gym.registry if is_popgym_id(env_id))


def popgym_family(env_id: str) -> str:
    """Family of a POPGym id: ``"popgym-RepeatPreviousEasy-v0"`` -> ``"RepeatPrevious"``."""
    if not is_popgym_id(env_id):
        raise ValueError(f"{env_id!r} is not a POPGym id (popgym-<Name><Easy|Medium|Hard>-v<N>)")
    name = env_id[len(POPGYM_PREFIX) :].rsplit("-v", 1)[0]
    for level in POPGYM_LEVELS:
        if name.endswith(level):
            return name[: -len(level)]
    raise ValueError(f"{env_id!r} does not end in one of the POPGym levels {POPGYM_LEVELS}")


def _import_popgym() -> None:
    try:
        import popgym  # noqa: F401  (registers the popgym-* ids)
    except ImportError as error:
        raise ImportError("POPGym is not installed: pip install 'sb3-elmur[popgym]' (popgym and mazelib)") from error


def popgym_wrappers(previous_action: bool = True) -> List[type]:
    """Wrapper classes :func:`make_popgym_env` applies, in order (for ``make_vec_env(wrapper_class=...)``)."""
    return [FlattenObservationWrapper, PreviousActionWrapper] if previous_action else [FlattenObservationWrapper]


def make_popgym_env(env_id: str, previous_action: bool = True, **env_kwargs: Any) -> gym.Env:
    """Make a POPGym environment that SB3 policies take: flat float32 observations, optionally with the
    previous action appended.

    :param env_id: a POPGym id, e.g. ``"popgym-RepeatPreviousEasy-v0"``
    :param previous_action: append the previous action (:class:`PreviousActionWrapper`)
    :param env_kwargs: passed to ``gym.make``
    :return: the wrapped environment
    """
    if not is_popgym_id(env_id):
        raise ValueError(f"{env_id!r} is not a POPGym id (popgym-<Name><Easy|Medium|Hard>-v<N>)")
    _import_popgym()
    if env_id not in gym.registry:
        if "Labyrinth" in env_id and importlib.util.find_spec("mazelib") is None:
            raise ValueError(f"{env_id!r} is registered by popgym only when mazelib is installed: pip install mazelib")
        close = difflib.get_close_matches(env_id, popgym_env_ids(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown POPGym id {env_id!r}{hint}")
    env = gym.make(env_id, **env_kwargs)
    for wrapper_class in popgym_wrappers(previous_action):
        env = wrapper_class(env)
    return env


__all__ = [
    "FlattenObservationWrapper",
    "PreviousActionWrapper",
    "encode",
    "encoded_bounds",
    "encoded_size",
    "is_popgym_id",
    "make_popgym_env",
    "popgym_env_ids",
    "popgym_family",
    "popgym_wrappers",
]
