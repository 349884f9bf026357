"""Offline data: episodes in memory or in Minari datasets, window sampling for recurrent behaviour cloning,
and dataset makers (T-Maze oracle demonstrations; episodes of any SB3 policy on any gymnasium env).

    python -m sb3_elmur.datasets tmaze --dataset-id tmaze/oracle-v0
    python -m sb3_elmur.datasets collect --algo RecurrentPPO --model model.zip --env CartPole-v1 \\
        --episodes 100 --dataset-id cartpole/ppo-v0
"""

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_elmur.bc.minari import (
    _MINARI_METADATA_REMINDERS,
    STAGING_PREFIX,
    _exclusive_write,
    _import_minari,
    _minari_datasets_path,
    _restore_replaced,
    check_minari_id,
)
from sb3_elmur.common.utils import staging_folder

Observations = Union[np.ndarray, Dict[str, np.ndarray]]

# Episodes are checked against a space in blocks of about this size: vectorised, yet bounded in memory.
_CHECK_BLOCK_BYTES = 64 * 2**20


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


class Windows(NamedTuple):
    """A batch of training windows, and what their episodes showed before them (for the memory a window starts
    from: see ``RecurrentBC(burn_in=True)``)."""

    observations: Observations  # [B, window, ...], zero-padded past the episode's end
    actions: np.ndarray  # [B, window, ...]
    mask: np.ndarray  # [B, window]: 1 on real steps
    prefixes: Observations  # [B, P, ...]: each episode's steps before its window, zero-padded at the end
    prefix_segments: np.ndarray  # [B]: segments in each prefix (windows start at segment boundaries)
    final_actions: np.ndarray  # [B, ...]: the last action of each window's episode (RecurrentBC's final_action_coef)


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


def _numeric_array(values: Any, what: str) -> np.ndarray:
    """``values`` as an array of numbers with one row per step, or an error naming ``what`` is wrong."""
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{what} are not a rectangular array of numbers ({error})") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} have dtype {array.dtype}: expected numbers (bool, int or float)")
    if array.ndim == 0:
        raise ValueError(f"{what} are a single number {array!r}: expected one row per step")
    return array


def _as_episode(index: int, episode: Any) -> Episode:
    """Episode ``index`` of a dataset as an :class:`Episode` of arrays, checked for types and lengths."""
    if isinstance(episode, Mapping):
        missing = [key for key in ("observations", "actions") if key not in episode]
        if missing:
            raise ValueError(f"episode {index} has no {' or '.join(map(repr, missing))}: keys are {sorted(episode)}")
        observations, actions, rewards = episode["observations"], episode["actions"], episode.get("rewards")
    elif hasattr(episode, "observations") and hasattr(episode, "actions"):  # Episode, Minari's EpisodeData
        observations, actions, rewards = episode.observations, episode.actions, getattr(episode, "rewards", None)
    else:
        raise TypeError(
            f"episode {index} is a {type(episode).__name__}: expected an Episode, or a dict with 'observations', "
            "'actions' and optional 'rewards'"
        )
    actions = _numeric_array(actions, f"episode {index}: actions")
    if isinstance(observations, Mapping):
        observations = {key: _numeric_array(v, f"episode {index}: observations[{key!r}]") for key, v in observations.items()}
        lengths = {key: len(v) for key, v in observations.items()}
        if not lengths or len(set(lengths.values())) > 1:
            raise ValueError(f"episode {index}: the observation arrays need one common length, got {lengths}")
    else:
        observations = _numeric_array(observations, f"episode {index}: observations")
    n_steps, n_obs = len(actions), n_rows(observations)
    if n_steps < 1:
        raise ValueError(f"episode {index} has no steps: every episode needs at least one action")
    if n_obs not in (n_steps, n_steps + 1):
        raise ValueError(f"episode {index} has {n_obs} observations for {n_steps} actions (need T or T + 1)")
    if rewards is not None:
        rewards = _numeric_array(rewards, f"episode {index}: rewards")
        if rewards.shape != (n_steps,):
            raise ValueError(f"episode {index}: rewards have shape {rewards.shape}, need ({n_steps},), one per action")
    return Episode(_take(observations, slice(0, n_steps)), actions, rewards)


def _step_shapes(episode: Episode) -> Tuple[Any, Tuple[int, ...]]:
    observations = map_observations(episode.observations, lambda v: v.shape[1:])
    return observations, episode.actions.shape[1:]


class EpisodeDataset:
    """A list of episodes for offline training, with checks and window sampling.

    :param episodes: :class:`Episode` objects or dicts with keys ``observations``, ``actions`` (``rewards``)
    """

    def __init__(self, episodes: Iterable) -> None:
        if isinstance(episodes, (np.ndarray, Mapping, str, bytes)) or not isinstance(episodes, Iterable):
            raise TypeError(
                f"EpisodeDataset takes a list of episodes (Episode objects, or dicts with 'observations', 'actions' "
                f"and optional 'rewards'), got a {type(episodes).__name__}; read a Minari dataset with "
                "EpisodeDataset.from_minari(dataset_id)"
            )
        self.episodes: List[Episode] = [_as_episode(i, episode) for i, episode in enumerate(episodes)]
        if not self.episodes:
            raise ValueError("the dataset is empty: it holds no episodes")
        # Windows of different episodes are stacked into one batch, so every step must have the same shapes.
        first = _step_shapes(self.episodes[0])
        for i, episode in enumerate(self.episodes[1:], start=1):
            shapes = _step_shapes(episode)
            if shapes != first:
                raise ValueError(
                    f"episode {i} has per-step shapes (observations, actions) {shapes}, episode 0 has {first}: "
                    "every episode needs the same"
                )

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def n_steps(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    @classmethod
    def from_minari(cls, dataset: Any) -> "EpisodeDataset":
        """Read a Minari dataset (an id for ``minari.load_dataset``, or a loaded ``MinariDataset``)."""
        minari = _import_minari()
        if isinstance(dataset, str):
            dataset = minari.load_dataset(dataset)
        return cls(list(dataset.iterate_episodes()))

    def check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Check every step of every episode against the env's spaces: shapes, Dict keys, finite values,
        integer values in range for Discrete / MultiDiscrete / MultiBinary, bounds for Box.

        :raise ValueError: naming the episode, the step and the value that does not fit
        """
        observations = self.episodes[0].observations
        if isinstance(observation_space, spaces.Dict):
            if not isinstance(observations, dict):
                raise ValueError(f"the observations are arrays, but the observation space is a Dict: {observation_space}")
            missing = sorted(set(observation_space.spaces) - set(observations))
            extra = sorted(set(observations) - set(observation_space.spaces))
            if missing or extra:
                raise ValueError(
                    f"the observations have the keys {sorted(observations)}, the observation space {observation_space} "
                    f"has {sorted(observation_space.spaces)} (missing: {missing}, not in the space: {extra})"
                )
            for key, space in observation_space.spaces.items():
                arrays = [ep.observations[key] for ep in self.episodes]
                _check_values(arrays, space, f"observation {key!r}", observation_space, "observation space")
        else:
            if isinstance(observations, dict):
                raise ValueError(
                    f"the observations are dicts (keys {sorted(observations)}), "
                    f"but the observation space is {observation_space}"
                )
            arrays = [ep.observations for ep in self.episodes]
            _check_values(arrays, observation_space, "observation", observation_space, "observation space")
        _check_values([ep.actions for ep in self.episodes], action_space, "action", action_space, "action space")

    def sample_windows(self, rng: np.random.Generator, batch_size: int, window: int, segment: int) -> Windows:
        """Sample ``batch_size`` windows of ``window`` steps, zero-padded past the episode's end.

        A window starts at a segment boundary of its episode (step 0, ``segment``, 2 * ``segment``, ...) and
        as early as possible: an episode that fits in a window is always taken from its first step. The last
        start of a longer episode is the first boundary whose window reaches the episode's end (the window is
        padded past it), so that every step of every episode, the final action included, can be a target. The
        steps of its episode before a window come with it (``prefixes``), so that training can start the window
        from the memory of acting through them.

        :param rng: random generator
        :param batch_size: number of windows
        :param window: steps per window
        :param segment: steps per segment (windows start at multiples of it, where the memory state is defined)
        :return: the batch of windows
        """
        # Starts 0, segment, ..., up to the first one with start + window >= len: ceil((len - window) / segment)
        # further starts. Rounding down instead would leave the last (len - window) mod segment steps unsampled.
        starts_per_episode = np.array([-(-max(len(ep) - window, 0) // segment) + 1 for ep in self.episodes])
        choice = rng.choice(starts_per_episode.sum(), size=batch_size)
        episode_index = np.searchsorted(np.cumsum(starts_per_episode), choice, side="right")
        starts = np.array([segment * int(rng.integers(starts_per_episode[i])) for i in episode_index], dtype=np.int64)
        longest_prefix = int(starts.max())
        obs_batch, act_batch, prefixes = [], [], []
        mask = np.zeros((batch_size, window), dtype=np.float32)
        for b, (i, start) in enumerate(zip(episode_index, starts)):
            ep = self.episodes[i]
            stop = min(start + window, len(ep))
            mask[b, : stop - start] = 1.0
            obs_batch.append(_pad(_take(ep.observations, slice(start, stop)), window))
            act_batch.append(_pad(ep.actions[start:stop], window))
            prefixes.append(_pad(_take(ep.observations, slice(0, start)), longest_prefix))
        final_actions = np.stack([self.episodes[i].actions[-1] for i in episode_index])
        return Windows(_stack(obs_batch), np.stack(act_batch), mask, _stack(prefixes), starts // segment, final_actions)

    def to_minari(self, dataset_id: str, env: Union[str, gym.Env], overwrite: bool = False, **metadata: Any) -> Any:
        """Write the episodes as a Minari dataset (needs ``minari[hdf5]``); the final observation of each
        episode is repeated since Minari stores T + 1 observations.

        The dataset is written in a hidden folder of Minari's datasets folder and moved into place once
        complete: a failed write leaves no half-written dataset, and with ``overwrite`` the old one is kept.
        A write holds an exclusive lock on its id (another process writing the same id refuses), and checks under
        it that the id is still free: of two writers without ``overwrite``, the second refuses instead of replacing
        the first one's dataset. Every step is checked against the env's spaces first, since the dataset declares
        them.

        :param dataset_id: Minari id, ``(namespace/)name-vN``
        :param env: the environment (or its id) the episodes come from
        :param overwrite: replace a dataset that already has this id
        :param metadata: keyword arguments of ``minari.create_dataset_from_buffers`` (``author``, ...)
        :return: the written ``MinariDataset``
        :raise FileExistsError: if the id exists and ``overwrite`` is False, or another write of it is under way
        :raise ValueError: naming the episode, step and value that the env's spaces do not hold
        """
        minari = _import_minari()
        from minari.data_collector.episode_buffer import EpisodeBuffer
        from minari.storage import get_dataset_path

        target = check_minari_id(dataset_id, overwrite)
        self._check_env_spaces(env)
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
        with _exclusive_write(dataset_id, Path(get_dataset_path())):
            # Again under the lock: a writer that finished since the check above has made the id taken.
            check_minari_id(dataset_id, overwrite)
            replaced = self._write_minari(dataset_id, target, env, buffers, metadata)
        if replaced:
            print(f"replaced the Minari dataset {dataset_id} at {target}")
        return minari.load_dataset(dataset_id)

    def _check_env_spaces(self, env: Union[str, gym.Env]) -> None:
        """Check every step against the spaces of ``env`` (an env, or an id made for the check) before writing a
        dataset that declares them.

        :raise ValueError: naming the env, the episode, the step and the value that does not fit
        """
        made = gym.make(env) if isinstance(env, str) else None
        checked = made if made is not None else env
        try:
            self.check_spaces(checked.observation_space, checked.action_space)
        except ValueError as error:
            name = env if isinstance(env, str) else getattr(env.spec, "id", None) or type(env.unwrapped).__name__
            raise ValueError(f"the episodes do not fit the env {name!r} the dataset is written for: {error}") from None
        finally:
            if made is not None:
                made.close()

    @staticmethod
    def _write_minari(dataset_id: str, target: Path, env: Union[str, gym.Env], buffers: List[Any],
                      metadata: Dict[str, Any]) -> bool:
        """Write the episode buffers as dataset ``dataset_id`` in a staging folder and move it to ``target``.

        :return: whether an existing dataset was replaced
        """
        minari = _import_minari()
        from minari.dataset.minari_dataset import parse_dataset_id
        from minari.namespace import create_namespace, list_local_namespaces
        from minari.storage import get_dataset_path

        # Inside the datasets folder, so that the final move is a rename on one file system; the staging folders
        # of writes that were killed are removed first.
        with staging_folder(Path(get_dataset_path()), STAGING_PREFIX, legacy_prefix=".sb3_elmur-writing-",
                            salvage=_restore_replaced) as staging:
            with _minari_datasets_path(staging), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_MINARI_METADATA_REMINDERS, category=UserWarning, module=r"minari\.")
                minari.create_dataset_from_buffers(dataset_id, buffers, env=env, **metadata)
            namespace = parse_dataset_id(dataset_id)[0]
            if namespace is not None and namespace not in list_local_namespaces():
                create_namespace(namespace)
            replaced = target.exists()
            if replaced:
                # Where it goes back to, should this process be killed before the new one is in place.
                (staging / "target").write_text(str(target))
                os.replace(target, staging / "replaced")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging / dataset_id, target)
            except OSError:
                if replaced:
                    os.replace(staging / "replaced", target)
                raise
        return replaced


def _check_values(
    arrays: List[np.ndarray], space: spaces.Space, what: str, full_space: spaces.Space, role: str
) -> None:
    """Check the per-episode ``arrays`` (one row per step) against ``space``, block by block.

    :param arrays: one array per episode
    :param space: the space of one row
    :param what: what a row is, for the error (``action``, ``observation 'image'``)
    :param full_space: the env's space the error names (a Dict space holding ``space``, or ``space``)
    :param role: ``observation space`` or ``action space``
    """
    if not isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        raise ValueError(
            f"the {role} {full_space} is not supported: use Box, Discrete, MultiDiscrete, MultiBinary or a Dict of them"
        )
    step_shape = arrays[0].shape[1:]
    allowed_shapes = [(), (1,)] if isinstance(space, spaces.Discrete) else [space.shape]
    if step_shape not in allowed_shapes:
        raise ValueError(
            f"each {what} has shape {step_shape}, but the {role} {full_space} needs {space.shape or '()'}"
        )
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    for start, block in _blocks(arrays):
        for bad, reason in _violations(block, space):
            rows = bad.reshape(len(block), -1).any(axis=1)
            if rows.any():
                row = start + int(rows.argmax())
                episode = int(np.searchsorted(offsets, row, side="right")) - 1
                step = block[row - start]
                value = np.array2string(step, threshold=20) if step.ndim else repr(step.item())
                raise ValueError(
                    f"episode {episode}, step {row - offsets[episode]}: {what} {value} {reason} "
                    f"(the {role} is {full_space})"
                )


def _blocks(arrays: List[np.ndarray]) -> Iterator[Tuple[int, np.ndarray]]:
    """Consecutive arrays concatenated into blocks of about ``_CHECK_BLOCK_BYTES``, with each block's first row."""
    group: List[np.ndarray] = []
    start = size = rows = 0
    for array in arrays:
        group.append(array)
        size += array.nbytes
        rows += len(array)
        if size >= _CHECK_BLOCK_BYTES:
            yield start, np.concatenate(group)
            group, start, size = [], rows, 0
    if group:
        yield start, np.concatenate(group)


def _violations(values: np.ndarray, space: spaces.Space) -> Iterator[Tuple[np.ndarray, str]]:
    """Element-wise masks of the values (one row per step) that ``space`` does not contain, with the reason.

    A generator: each check may assume the previous ones passed (e.g. the range check, finite values)."""
    integral = not isinstance(space, spaces.Box) or np.issubdtype(space.dtype, np.integer)
    if values.dtype.kind == "f":
        yield ~np.isfinite(values), "is not finite"
        if integral:
            yield values != np.round(values), f"is not a whole number ({type(space).__name__} spaces hold integers)"
    if isinstance(space, spaces.Discrete):
        low, high = int(space.start), int(space.start + space.n - 1)
        yield (values < low) | (values > high), f"is outside {low}..{high}"
    elif isinstance(space, spaces.MultiDiscrete):
        yield (values < space.start) | (values > space.start + space.nvec - 1), "is outside start..start + nvec - 1"
    elif isinstance(space, spaces.MultiBinary):
        yield (values != 0) & (values != 1), "is not 0 or 1"
    else:
        yield (values < space.low) | (values > space.high), "is outside the bounds"


def _stack(rows: List[Observations]) -> Observations:
    if isinstance(rows[0], dict):
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    return np.stack(rows)


def _pad(values: Observations, length: int) -> Observations:
    if isinstance(values, dict):
        return map_observations(values, lambda v: _pad(v, length))
    values = np.asarray(values)
    padding = np.zeros((length - len(values), *values.shape[1:]), dtype=values.dtype)
    return np.concatenate([values, padding])
