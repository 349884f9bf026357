"""
T-Maze memory task, as used in the RATE and ELMUR papers.

The agent walks along a corridor ``x = 0..L`` and, at the junction ``x = L``,
has to turn up or down. Which turn is correct is given by a cue that is only
visible in the very first observation of the episode, so the task measures how
long a policy can keep one bit of information in memory.

Two implementations share the same semantics:

- :class:`TMazeEnv`: a plain ``gymnasium.Env`` (passes SB3's ``check_env``)
- :class:`TMazeVecEnv`: a numpy-vectorized SB3 ``VecEnv`` for fast training

:class:`TMazeOracle` is a scripted, vectorized expert policy (e.g. to build offline datasets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_elmur.common.checks import check_bool
from sb3_elmur.common.vec_env import BatchedVecEnv

# Action ids
RIGHT, UP, LEFT, DOWN = 0, 1, 2, 3

VARIANTS = ("reference", "passive")

# Observation layout: [y, cue, at_junction, noise]
OBS_DIM = 4

# Number of noise values drawn at once by TMazeVecEnv
_NOISE_BLOCK_SIZE = 1 << 16


def _check_positive_int(value: Any, name: str) -> int:
    # bool is a subclass of int but ``corridor_length=True`` is almost surely a bug
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return int(value)


def _check_corridor_length(corridor_length: Any) -> int:
    return _check_positive_int(corridor_length, "corridor_length")


def _check_variant(variant: Any) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
    return variant


def _check_cue(cue: Any, name: str = "cue") -> int:
    if isinstance(cue, bool) or not isinstance(cue, (int, np.integer, float, np.floating)) or cue not in (-1, 1):
        raise ValueError(f"`{name}` must be +1 or -1, got {cue!r}")
    return int(cue)


def _make_observation_space() -> spaces.Box:
    return spaces.Box(low=-1.0, high=1.0, shape=(OBS_DIM,), dtype=np.float32)


class TMazeEnv(gym.Env):
    """
    T-Maze environment.

    Observation (float32, in [-1, 1]): ``[y, cue, at_junction, noise]`` where
    ``cue`` is non-zero only in the first observation of an episode,
    ``at_junction`` is 1.0 when ``x == corridor_length`` and ``noise`` is drawn
    uniformly from {-1, 0, 1} at every step (distractor).

    Actions: 0 right, 1 up, 2 left, 3 down. Up/down at the junction ends the
    episode with reward 1 if the goal matches the cue (else 0). The episode is
    ended after ``corridor_length + 2`` steps (a failure). ``info["is_success"]`` is set
    on the last step of every episode.

    :param corridor_length: Length ``L`` of the corridor (int >= 1)
    :param variant: ``"reference"`` (no shaping) or ``"passive"``
        (Ni et al. 2023: penalty of ``-1/L`` for every non-right action in the corridor)
    :param noise: Whether to fill the last observation entry with random noise (else 0)
    :param render_mode: ``None``, ``"ansi"`` (text) or ``"rgb_array"`` (one 8x8 block per cell; SB3's
        ``make_vec_env`` asks for it)
    :param terminate_on_timeout: end a timed-out episode as terminated (a failure, the default) instead of
        truncated (the default until 2026-12-06). The time limit is part of the task, so the value after it is 0;
        SB3's algorithms bootstrap a truncation with the last state's value, so waiting at the junction looks as
        good as turning: ElmurPPO's defaults at corridor 100 (``benchmarks/results/online_memory.md``) end at 1.00
        on 3 of 3 seeds with terminations, at 0.50 on 3 of 3 with truncation (two solved it and lost it).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        corridor_length: int = 10,
        variant: str = "reference",
        noise: bool = True,
        render_mode: str | None = None,
        terminate_on_timeout: bool = True,
    ):
        super().__init__()
        self.terminate_on_timeout = check_bool("terminate_on_timeout", terminate_on_timeout)
        self.corridor_length = _check_corridor_length(corridor_length)
        self.variant = _check_variant(variant)
        self.noise = check_bool("noise", noise)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"`render_mode` must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode

        # The shortest successful path needs L + 1 steps, so the agent has one spare step
        self.time_limit = self.corridor_length + 2
        self.penalty = 1.0 / self.corridor_length if self.variant == "passive" else 0.0

        self.observation_space = _make_observation_space()
        self.action_space = spaces.Discrete(4)

        self.position = 0
        self.y = 0
        self.cue = 1
        self.elapsed_steps = 0

    def _get_obs(self, first: bool) -> np.ndarray:
        noise = float(self.np_random.integers(-1, 2)) if self.noise else 0.0
        return np.array(
            [
                self.y,
                self.cue if first else 0.0,
                1.0 if self.position == self.corridor_length else 0.0,
                noise,
            ],
            dtype=np.float32,
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """
        Reset the environment.

        :param seed: Seed for the environment RNG
        :param options: Optional ``{"cue": +1 or -1}`` to fix the cue of this episode
        :return: first observation (the only one showing the cue) and an empty info dict
        """
        super().reset(seed=seed)
        if options is not None and options.get("cue") is not None:
            self.cue = _check_cue(options["cue"])
        else:
            self.cue = int(self.np_random.integers(0, 2)) * 2 - 1
        self.position = 0
        self.y = 0
        self.elapsed_steps = 0
        return self._get_obs(first=True), {}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        action = int(action)
        if action not in (RIGHT, UP, LEFT, DOWN):
            raise ValueError(f"Invalid action {action!r}, must be in [0, 3]")

        at_junction = self.position == self.corridor_length
        reward = 0.0
        terminated = False
        # Shaping of the passive T-Maze: anything but going right in the corridor is penalized
        if not at_junction and action != RIGHT:
            reward -= self.penalty

        if action == RIGHT and not at_junction:
            self.position += 1
        elif action == LEFT and self.position > 0:
            self.position -= 1
        elif action in (UP, DOWN) and at_junction:
            self.y = 1 if action == UP else -1
            terminated = True
        # Any other move hits a wall and does nothing

        self.elapsed_steps += 1
        success = terminated and self.y == self.cue
        if success:
            reward += 1.0
        truncated = not terminated and self.elapsed_steps >= self.time_limit
        if truncated and self.terminate_on_timeout:
            terminated, truncated = True, False

        info: dict[str, Any] = {}
        if terminated or truncated:
            info["is_success"] = success
        return self._get_obs(first=False), reward, terminated, truncated, info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("You are calling render() without specifying a render_mode ('ansi' or 'rgb_array').")
            return None
        text = _render_ansi(self.corridor_length, self.position, self.y, self.cue, self.elapsed_steps, self.time_limit)
        return text if self.render_mode == "ansi" else _render_rgb(text, self.cue)


# Cell colours of the rgb_array rendering: agent, correct goal, other goal, corridor, junction, wall.
_COLOURS = {"A": (220, 40, 40), "G": (40, 180, 40), "X": (90, 90, 90), ".": (230, 230, 230), "J": (240, 200, 60), " ": (0, 0, 0)}


def _render_rgb(text: str, cue: int, cell: int = 8) -> np.ndarray:
    rows = text.splitlines()[1:]  # the three maze rows of the text rendering
    goal_row = 0 if cue > 0 else 2
    grid = [
        [("G" if r == goal_row else "X") if ch in "UD" else ch for ch in row.ljust(len(rows[1]))]
        for r, row in enumerate(rows)
    ]
    image = np.array([[_COLOURS[ch] for ch in row] for row in grid], dtype=np.uint8)
    return image.repeat(cell, axis=0).repeat(cell, axis=1)


def _render_ansi(corridor_length: int, position: int, y: int, cue: int, elapsed_steps: int, time_limit: int) -> str:
    corridor = ["."] * corridor_length + ["J"]
    if y == 0:
        corridor[position] = "A"
    up = "A" if y == 1 else "U"
    down = "A" if y == -1 else "D"
    pad = " " * corridor_length
    return f"step {elapsed_steps}/{time_limit} cue {cue:+d}\n{pad}{up}\n{''.join(corridor)}\n{pad}{down}\n"


class TMazeVecEnv(BatchedVecEnv):
    """
    Batch of ``num_envs`` T-Mazes simulated with numpy (no Python loop over envs
    except to build the info dicts of finished episodes).

    Same semantics, observation and action spaces as :class:`TMazeEnv`.
    Finished episodes are reset automatically; the last observation is stored in
    ``infos[i]["terminal_observation"]``, ``infos[i]["is_success"]`` is set on the
    last step and ``infos[i]["TimeLimit.truncated"]`` is True for timeouts with ``terminate_on_timeout=False`` (else False).

    There are no sub-env objects: ``get_attr``/``set_attr``/``env_method`` act on
    this batch object, except for the per-env state ``cue``, ``position``,
    ``elapsed_steps`` and ``episode_corridor_length`` which ``get_attr`` returns per env.

    :param num_envs: Number of environments
    :param corridor_length: Length ``L`` of the corridor (int >= 1), or a range ``(low, high)``: every episode
        then draws its own length uniformly in ``low..high`` (time limit ``L + 2`` and penalty ``1 / L`` of
        that episode), so that one training run sees short and long memory gaps
    :param variant: ``"reference"`` or ``"passive"``
    :param noise: Whether to fill the last observation entry with random noise (else 0)
    :param seed: Seed of the (shared) random generator
    :param cues: Optional array of +1/-1 (one per env) fixing the cue of every episode
        of each env (e.g. for balanced evaluation)
    :param terminate_on_timeout: report time-outs as terminations (``TimeLimit.truncated`` False; the default),
        see :class:`TMazeEnv`
    """

    per_env_attrs = {"cue": "_cue", "position": "_x", "elapsed_steps": "_steps", "episode_corridor_length": "_lengths"}

    def __init__(
        self,
        num_envs: int,
        corridor_length: int | tuple[int, int] = 10,
        variant: str = "reference",
        noise: bool = True,
        seed: int | None = None,
        cues: Sequence[int] | np.ndarray | None = None,
        terminate_on_timeout: bool = True,
    ):
        num_envs = _check_positive_int(num_envs, "num_envs")
        if isinstance(corridor_length, (tuple, list)):
            if len(corridor_length) != 2 or _check_corridor_length(corridor_length[0]) > _check_corridor_length(corridor_length[1]):
                raise ValueError(f"a `corridor_length` range must be (low, high) with 1 <= low <= high, got {corridor_length!r}")
            self._length_range = (int(corridor_length[0]), int(corridor_length[1]))
        else:
            self._length_range = (_check_corridor_length(corridor_length),) * 2
        self._variant = _check_variant(variant)
        self._noise = check_bool("noise", noise)
        self.terminate_on_timeout = check_bool("terminate_on_timeout", terminate_on_timeout)
        self._fixed_cues = self._check_cues(cues, num_envs)
        # The longest episode (the limit of the longest corridor, with a range)
        self.time_limit = self._length_range[1] + 2
        self.penalty = 1.0 / self._length_range[0] if self._variant == "passive" else 0.0
        # seed: reseeds at the first reset() as well, so that seed=s behaves like seed(s) + reset()
        super().__init__(num_envs, _make_observation_space(), spaces.Discrete(4), seed=seed)

        self._set_rng(seed)
        self._lengths = np.full(num_envs, self._length_range[0], dtype=np.int64)
        self._penalties = np.zeros(num_envs, dtype=np.float32)
        self._x = np.zeros(num_envs, dtype=np.int64)
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._cue = np.ones(num_envs, dtype=np.int64)
        self._obs = np.zeros((num_envs, OBS_DIM), dtype=np.float32)
        self._actions = np.zeros(num_envs, dtype=np.int64)
        self._reset_envs(np.arange(num_envs))

    @staticmethod
    def _check_cues(cues: Sequence[int] | np.ndarray | None, num_envs: int) -> np.ndarray | None:
        if cues is None:
            return None
        cues_arr = np.asarray(cues)
        if cues_arr.shape != (num_envs,) or not np.all((cues_arr == 1) | (cues_arr == -1)):
            raise ValueError(f"`cues` must be an array of +1/-1 of length num_envs={num_envs}, got {cues!r}")
        return cues_arr.astype(np.int64)

    # Read-only: changing them would invalidate the time limit and penalty
    @property
    def corridor_length(self) -> int | tuple[int, int]:
        low, high = self._length_range
        return low if low == high else (low, high)

    @property
    def variant(self) -> str:
        return self._variant

    @property
    def noise(self) -> bool:
        return self._noise

    @property
    def cues(self) -> np.ndarray | None:
        """Fixed cues (one per env) or None when cues are random."""
        return None if self._fixed_cues is None else self._fixed_cues.copy()

    def _set_rng(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)
        # Drop noise drawn with the previous generator so that seeding is reproducible
        self._noise_block = np.zeros((0, 2 * self.num_envs), dtype=np.float32)
        self._noise_row = 0

    def _next_noise(self) -> np.ndarray:
        """
        Noise for one step: row of shape (2 * num_envs,), the first half for the
        observations after the step, the second half for the envs that get reset.
        """
        # Drawing a whole block at once amortizes the RNG call overhead (the main per-step cost otherwise)
        if self._noise_row >= len(self._noise_block):
            n_rows = max(1, _NOISE_BLOCK_SIZE // (2 * self.num_envs))
            self._noise_block = self._rng.integers(-1, 2, size=(n_rows, 2 * self.num_envs), dtype=np.int8).astype(np.float32)
            self._noise_row = 0
        row = self._noise_block[self._noise_row]
        self._noise_row += 1
        return row

    def _new_cues(self, indices: np.ndarray) -> np.ndarray:
        """The cues of new episodes of the envs ``indices``: the fixed ones when given, else random."""
        if self._fixed_cues is not None:
            return self._fixed_cues[indices]
        return self._rng.integers(0, 2, size=len(indices)) * 2 - 1

    def _reset_envs(self, indices: np.ndarray, cues: np.ndarray | None = None, noise: np.ndarray | None = None) -> None:
        """
        Start a new episode for the given envs and write their first observation.

        :param indices: Indices of the envs to reset
        :param cues: Cues to use (else fixed cues when given, else random)
        :param noise: Noise of the first observations (drawn when None and noise is enabled)
        """
        if cues is None:
            cues = self._new_cues(indices)
        low, high = self._length_range
        if low < high:
            self._lengths[indices] = self._rng.integers(low, high + 1, size=len(indices))
        if self._variant == "passive":
            self._penalties[indices] = 1.0 / self._lengths[indices]
        self._x[indices] = 0
        self._steps[indices] = 0
        self._cue[indices] = cues
        self._obs[indices, 0] = 0.0
        self._obs[indices, 1] = cues
        # x = 0 is never the junction since L >= 1
        self._obs[indices, 2] = 0.0
        if self._noise:
            if noise is None:
                noise = self._next_noise()[self.num_envs :][indices]
            self._obs[indices, 3] = noise
        else:
            self._obs[indices, 3] = 0.0

    def reset(self) -> VecEnvObs:
        # Seeds and options (from seed() / set_options()) are only used once, like DummyVecEnv
        if self._seeds[0] is not None:
            self._set_rng(self._seeds[0])
        all_envs, cues = np.arange(self.num_envs), None
        if any(options.get("cue") is not None for options in self._options):
            cues = self._new_cues(all_envs)  # a copy (fancy indexing) of fixed cues
            for i, options in enumerate(self._options):
                if options.get("cue") is not None:
                    cues[i] = _check_cue(options["cue"])
        self._reset_envs(all_envs, cues)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return self._obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        if actions.size != self.num_envs:
            # numpy's reshape would say only "cannot reshape array of size 3 into shape (4,)"
            raise ValueError(
                f"TMazeVecEnv.step expects one action per env, {self.num_envs} actions, got {actions.size} "
                f"(actions of shape {actions.shape}: {actions!r})"
            )
        if actions.dtype.kind not in "iu":
            actions = actions.astype(np.int64)
        actions = actions.reshape(self.num_envs)
        # One cheap check for both < 0 and > 3 (negative ints stay non-zero when shifted)
        if (actions >> 2).any():
            raise ValueError(f"Invalid actions {actions!r}, must be in [0, 3]")
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        actions = self._actions
        x = self._x
        at_junction = x == self._lengths
        go_right = actions == RIGHT
        # Up (1) and down (3) are the odd actions
        vertical = (actions & 1).astype(bool)

        reached_goal = vertical & at_junction
        # Goal y: up -> +1, down -> -1
        goal_y = 2 - actions
        success = reached_goal & (goal_y == self._cue)

        # Moves into walls are no-ops. Updating x in place before the left move is fine:
        # an env that went right cannot also go left
        x += go_right & ~at_junction
        x -= (actions == LEFT) & (x > 0)
        self._steps += 1

        rewards = success.astype(np.float32)
        if self._variant == "passive":
            rewards -= (~(go_right | at_junction)) * self._penalties

        truncated = ~reached_goal & (self._steps >= self._lengths + 2)
        dones = reached_goal | truncated

        obs = self._obs
        obs[:, 0] = reached_goal * goal_y
        obs[:, 1] = 0.0
        obs[:, 2] = x == self._lengths
        reset_noise = None
        if self._noise:
            noise = self._next_noise()
            obs[:, 3] = noise[: self.num_envs]
            reset_noise = noise[self.num_envs :]

        done_idx = np.flatnonzero(dones)
        timeouts = truncated[done_idx] & (not self.terminate_on_timeout)
        infos = self._step_infos(done_idx, obs[done_idx], success[done_idx].tolist(), timeouts.tolist())
        if len(done_idx):
            self._reset_envs(done_idx, noise=None if reset_noise is None else reset_noise[done_idx])

        return obs.copy(), rewards, dones, infos

class TMazeOracle:
    """
    Scripted optimal policy for a batch of T-Mazes.

    It stores the cue of each env from the first observation of an episode, goes
    right until the at-junction flag is 1, then goes up for cue +1 and down for cue -1.

    :param num_envs: Number of environments it acts for
    """

    def __init__(self, num_envs: int = 1):
        self.num_envs = _check_positive_int(num_envs, "num_envs")
        self._cue = np.zeros(self.num_envs, dtype=np.float32)

    def reset(self) -> None:
        """Forget the cues of all envs."""
        self._cue[:] = 0.0

    def act(self, obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        """
        :param obs: Observations of shape (num_envs, 4) (or (4,) when num_envs == 1)
        :param episode_start: Boolean array (num_envs,), True where ``obs`` is the first
            observation of an episode (the one showing the cue)
        :return: actions of shape (num_envs,)
        """
        obs = np.asarray(obs, dtype=np.float32).reshape(self.num_envs, OBS_DIM)
        episode_start = np.asarray(episode_start, dtype=bool).reshape(self.num_envs)
        self._cue = np.where(episode_start, np.sign(obs[:, 1]), self._cue)
        # Without a remembered cue (should not happen) it picks down
        turn = np.where(self._cue > 0, UP, DOWN)
        return np.where(obs[:, 2] > 0.5, turn, RIGHT).astype(np.int64)

    def predict(
        self,
        observation: np.ndarray,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """
        SB3-like ``predict()`` so the oracle can be used with ``evaluate_policy``.

        :param observation: Observations (num_envs, 4)
        :param state: Unused, returned as is
        :param episode_start: Episode starts; when None, a non-zero cue entry marks the start
        :param deterministic: Unused (the oracle is deterministic)
        :return: actions and ``state``
        """
        observation = np.asarray(observation, dtype=np.float32).reshape(self.num_envs, OBS_DIM)
        if episode_start is None:
            episode_start = observation[:, 1] != 0
        return self.act(observation, episode_start), state
