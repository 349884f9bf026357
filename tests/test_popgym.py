"""POPGym with ElmurPolicy through our wrappers, and the wrappers' spaces and encodings.

The wrapper tests use small local envs and run without POPGym; the POPGym tests skip when it is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_elmur  # noqa: F401  (registers the policy names and T-Maze ids)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs.popgym import (
    encode,
    encoded_bounds,
    encoded_size,
    FlattenObservationWrapper,
    make_popgym_env,
    popgym_env_ids,
    popgym_family,
    PreviousActionWrapper,
)

torch.set_num_threads(1)
pytestmark = [
    # POPGym's own warnings: mazes are solvable without memory; infos shared between steps (gymnasium's checker).
    pytest.mark.filterwarnings("ignore:Maze environments have been shown:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*share an object:UserWarning"),
]

TINY = dict(d_model=16, n_layers=1, n_heads=2, memory_size=2, context_length=4)
FAMILIES = (
    "Autoencode", "Battleship", "Concentration", "CountRecall", "HigherLower", "LabyrinthEscape", "LabyrinthExplore",
    "MineSweeper", "MultiarmedBandit", "NoisyPositionOnlyCartPole", "NoisyPositionOnlyPendulum", "PositionOnlyCartPole",
    "PositionOnlyPendulum", "RepeatFirst", "RepeatPrevious", "VelocityOnlyCartpole",
)  # fmt: skip
ALL_POPGYM_IDS = sorted(f"popgym-{family}{level}-v0" for family in FAMILIES for level in ("Easy", "Medium", "Hard"))


class SpaceEnv(gym.Env):
    """Observations sampled from any space; episodes of ``length`` steps; remembers the actions it got."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, length: int = 3) -> None:
        super().__init__()
        self.observation_space, self.action_space, self.length = observation_space, action_space, length
        self.actions: List[Any] = []
        self._t = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None) -> Tuple[Any, Dict]:
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self._t = 0
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> Tuple[Any, float, bool, bool, Dict]:
        self.actions.append(action)
        self._t += 1
        return self.observation_space.sample(), 0.0, self._t >= self.length, False, {}


# ------------------------------------------------------------------------------------------------------------
# Encodings and wrappers
# ------------------------------------------------------------------------------------------------------------


def test_encode_discrete_is_one_hot_from_start():
    space = spaces.Discrete(3, start=-1)
    np.testing.assert_array_equal(encode(space, -1), [1, 0, 0])
    np.testing.assert_array_equal(encode(space, np.int64(1)), [0, 0, 1])
    assert encode(space, 0).dtype == np.float32
    for bad in (-2, 2):
        with pytest.raises(ValueError, match="does not belong"):
            encode(space, bad)


def test_encode_nested_multidiscrete_concatenates_one_hots():
    space = spaces.MultiDiscrete(np.array([[2, 3], [1, 2]]), start=np.array([[0, 1], [0, 0]]))
    value = np.array([[1, 3], [0, 0]])
    # blocks of 2, 3, 1, 2: index 1 | 3 - start 1 = 2 | 0 | 0
    np.testing.assert_array_equal(encode(space, value), [0, 1, 0, 0, 1, 1, 1, 0])
    assert encoded_size(space) == 8
    with pytest.raises(ValueError, match="does not belong"):
        encode(space, np.array([[2, 1], [0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        encode(space, np.array([1, 1]))


def test_encode_tuple_and_dict_in_space_order():
    tuple_space = spaces.Tuple((spaces.Discrete(2), spaces.Box(-2.0, 2.0, (2,)), spaces.MultiBinary(2)))
    np.testing.assert_array_equal(encode(tuple_space, (1, np.array([0.5, -1.5]), np.array([1, 0]))), [0, 1, 0.5, -1.5, 1, 0])
    low, high = encoded_bounds(tuple_space)
    np.testing.assert_array_equal(low, [0, 0, -2, -2, 0, 0])
    np.testing.assert_array_equal(high, [1, 1, 2, 2, 1, 1])
    dict_space = spaces.Dict({"b": spaces.Discrete(2), "a": spaces.Discrete(3)})
    order = list(dict_space.spaces)
    expected = np.concatenate([encode(dict_space[key], {"a": 2, "b": 0}[key]) for key in order])
    np.testing.assert_array_equal(encode(dict_space, {"a": 2, "b": 0}), expected)


@pytest.mark.parametrize(
    "space, size",
    [
        (spaces.Tuple((spaces.Discrete(2), spaces.Discrete(4))), 6),
        (spaces.MultiDiscrete([3, 3, 3]), 9),
        (spaces.Discrete(13), 13),
        (spaces.Box(-np.inf, np.inf, (2, 3), dtype=np.float64), 6),
        (spaces.Dict({"x": spaces.Discrete(2), "y": spaces.Tuple((spaces.MultiBinary(3),))}), 5),
    ],
)
def test_flatten_wrapper_gives_float32_vectors_in_its_space(space, size):
    env = FlattenObservationWrapper(SpaceEnv(space, spaces.Discrete(2)))
    assert env.observation_space == spaces.Box(*encoded_bounds(space), dtype=np.float32)
    assert env.observation_space.shape == (size,)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        assert obs.dtype == np.float32 and obs in env.observation_space
        obs, *_ = env.step(0)


@pytest.mark.parametrize("space", [spaces.Text(4), spaces.Sequence(spaces.Discrete(2)), spaces.Tuple((spaces.Text(2),))])
def test_flatten_wrapper_rejects_spaces_without_a_fixed_size(space):
    with pytest.raises(ValueError, match="cannot encode the observation space"):
        FlattenObservationWrapper(SpaceEnv(space, spaces.Discrete(2)))


@pytest.mark.parametrize(
    "action_space, action, encoding",
    [
        (spaces.Discrete(4), 2, [0, 0, 1, 0]),
        (spaces.Discrete(3, start=1), 1, [1, 0, 0]),
        (spaces.MultiDiscrete([2, 3]), np.array([1, 2]), [0, 1, 0, 0, 1]),
        (spaces.Box(-2.0, 2.0, (2,)), np.array([0.25, -1.5], dtype=np.float32), [0.25, -1.5]),
        (spaces.MultiBinary(3), np.array([1, 0, 1]), [1, 0, 1]),
    ],
)
def test_previous_action_is_appended_and_zero_at_episode_start(action_space, action, encoding):
    inner = SpaceEnv(spaces.Box(-1.0, 1.0, (3,)), action_space, length=2)
    env = PreviousActionWrapper(inner)
    size = len(encoding)
    assert env.observation_space.shape == (3 + size,)
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs[3:], np.zeros(size))
    obs, _, terminated, _, _ = env.step(action)
    np.testing.assert_allclose(obs[3:], encoding)
    assert obs in env.observation_space and not terminated
    obs, _, terminated, _, _ = env.step(action)
    assert terminated
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[3:], np.zeros(size))  # a new episode forgets the last action


def test_previous_action_wrapper_needs_a_flat_box():
    env = SpaceEnv(spaces.Tuple((spaces.Discrete(2), spaces.Discrete(4))), spaces.Discrete(2))
    with pytest.raises(ValueError, match="FlattenObservationWrapper first"):
        PreviousActionWrapper(env)
    with pytest.raises(ValueError, match="cannot encode the action space"):
        PreviousActionWrapper(SpaceEnv(spaces.Box(-1.0, 1.0, (2,)), spaces.Text(3)))


def test_wrappers_work_on_gym_make_envs_and_pass_sb3_check():
    # gym.make adds gymnasium's own wrappers (order enforcing, env checker): ours must not depend on the raw env.
    env = PreviousActionWrapper(FlattenObservationWrapper(gym.make("sb3_elmur/TMaze-v0", corridor_length=3)))
    check_env(env, warn=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4 + 4,) and not obs[4:].any()
    obs, *_ = env.step(3)
    np.testing.assert_array_equal(obs[4:], [0, 0, 0, 1])


# ------------------------------------------------------------------------------------------------------------
# POPGym
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def popgym_ids() -> List[str]:
    pytest.importorskip("popgym")
    pytest.importorskip("mazelib")  # without it popgym registers only 42 ids (no Labyrinth)
    return popgym_env_ids()


def test_popgym_registers_the_48_ids_of_16_families(popgym_ids):
    assert popgym_ids == ALL_POPGYM_IDS
    assert sorted({popgym_family(env_id) for env_id in popgym_ids}) == sorted(FAMILIES)


def test_every_popgym_id_runs_with_elmur_policy(popgym_ids):
    for env_id in popgym_ids:
        env = DummyVecEnv([lambda env_id=env_id: make_popgym_env(env_id)] * 2)
        space = env.observation_space
        assert isinstance(space, spaces.Box) and space.dtype == np.float32 and len(space.shape) == 1, env_id
        model = RecurrentPPO("ElmurPolicy", env, n_steps=4, batch_size=8, policy_kwargs=TINY, seed=0, device="cpu")
        obs, state, starts = env.reset(), None, np.ones(env.num_envs, dtype=bool)
        for _ in range(4):
            assert all(row in space for row in obs), env_id  # bounds hold, observation and previous-action parts
            actions, state = model.predict(obs, state=state, episode_start=starts)
            assert actions.shape[0] == env.num_envs and env.action_space.contains(actions[0]), env_id
            obs, _, starts, _ = env.step(actions)
        env.close()


@pytest.mark.parametrize("policy, policy_kwargs", [("ElmurPolicy", TINY), ("MlpLstmPolicy", dict(lstm_hidden_size=8))])
def test_one_update_on_every_popgym_id(popgym_ids, policy, policy_kwargs):
    # Training goes through evaluate_actions for Discrete, MultiDiscrete and Box actions; the LSTM baseline
    # needs the flattened observations too (torch rejects the np.int64 feature size of raw MultiDiscrete).
    for env_id in popgym_ids:
        env = DummyVecEnv([lambda env_id=env_id: make_popgym_env(env_id)] * 2)
        model = RecurrentPPO(policy, env, n_steps=8, batch_size=16, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
        model.learn(16)
        assert model.num_timesteps == 16 and model._n_updates == 1, env_id
        assert all(torch.isfinite(p).all() for p in model.policy.parameters()), env_id
        env.close()


def test_popgym_previous_action_is_the_action_taken(popgym_ids):
    env = make_popgym_env("popgym-BattleshipEasy-v0")  # Discrete(2) observations, MultiDiscrete([8, 8]) actions
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2 + 16,) and not obs[2:].any()
    obs, *_ = env.step(np.array([3, 5]))
    np.testing.assert_array_equal(np.flatnonzero(obs[2:]), [3, 8 + 5])
    assert make_popgym_env("popgym-BattleshipEasy-v0", previous_action=False).observation_space.shape == (2,)


def test_make_popgym_env_names_bad_ids(popgym_ids):
    with pytest.raises(ValueError, match="not a POPGym id"):
        make_popgym_env("CartPole-v1")
    with pytest.raises(ValueError, match="did you mean 'popgym-RepeatPreviousEasy-v0'"):
        make_popgym_env("popgym-RepeatPreviusEasy-v0")
    with pytest.raises(ValueError, match="levels"):
        popgym_family("popgym-RepeatPrevious-v0")


def test_offline_benchmark_clones_an_expert_and_tabulates_both_policies(popgym_ids, tmp_path):
    """``benchmarks/popgym_offline.py``, tiny: an expert's episodes, both policies cloned, evaluated and tabulated;
    a second run with another budget is refused rather than mixed into the records."""
    task = "popgym-RepeatPreviousEasy-v0"
    expert = ElmurPPO("ElmurPolicy", DummyVecEnv([lambda: make_popgym_env(task)]), n_steps=8, batch_size=8,
                      policy_kwargs=dict(d_model=8, n_layers=1, n_heads=1, memory_size=2, context_length=4))
    expert.save(tmp_path / "runs" / task / "ElmurPPO-ElmurPolicy" / "seed0_model.zip")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "popgym_offline.py"
    command = [sys.executable, str(script), "--tasks", task, "--seeds", "0", "--episodes", "2", "--gradient-steps",
               "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "report")]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    report = (tmp_path / "report.md").read_text()
    records = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert sorted(records) == [f"{task}/ElmurPolicy_s0", f"{task}/MlpLstmPolicy_s0", f"{task}/expert"]
    # A fresh clone has the report's JSON but no records: --report-only rebuilds the same table from it.
    rebuild = [sys.executable, str(script), "--out", str(tmp_path / "none"), "--report", str(tmp_path / "report"),
               "--report-only", "--overwrite"]
    subprocess.run(rebuild, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "report.md").read_text() == report
    assert "ELMUR against BC-LSTM on 1 task(s): ahead on " in report
    row = next(line for line in report.splitlines() if line.startswith(f"| {task} |"))
    assert row.count(" ± ") == 2 and "| 1/1 |" in row and row.split("|")[-2].strip() in ("ahead", "tie", "behind")
    # Means within 0.01 (0.005 of POPGym's normalised score) are a tie, not a win: the verdicts from crafted records.
    saved = json.loads((tmp_path / "report.json").read_text())
    runs = {}
    for lstm, verdict in ((0.49, "ahead"), (0.505, "tie"), (0.53, "behind")):
        runs[f"{verdict}/expert"] = saved["runs"][f"{task}/expert"]
        for name, value in (("ElmurPolicy", 0.51), ("MlpLstmPolicy", lstm)):
            runs[f"{verdict}/{name}_s0"] = {**saved["runs"][f"{task}/{name}_s0"],
                                            "evaluations": {"100": {"mean_return": value, "std_return": 0.0}}}
    (tmp_path / "crafted.json").write_text(json.dumps({**saved, "runs": runs}))
    subprocess.run([*rebuild[:-4], "--report", str(tmp_path / "crafted"), "--report-only", "--overwrite"],
                   check=True, capture_output=True, timeout=300)
    crafted = (tmp_path / "crafted.md").read_text()
    for verdict in ("ahead", "tie", "behind"):
        row = next(line for line in crafted.splitlines() if line.startswith(f"| {verdict} |"))
        assert row.split("|")[-2].strip() == verdict
    assert "on 3 task(s): ahead on 1, tied on 1, behind on 1." in crafted
    again = subprocess.run(command + ["--gradient-steps", "3"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "gradient_steps=2, not 3" in again.stderr and "Traceback" not in again.stderr


def test_segment_positions_reports_each_model_and_their_mean(popgym_ids, tmp_path):
    """``benchmarks/segment_positions.py`` with one model per seed: a row each after the first segment, and the mean
    row is their mean; models whose segments differ are refused."""
    task = "popgym-RepeatPreviousEasy-v0"
    paths = []
    for seed, context in ((0, 4), (1, 4), (2, 5)):
        model = ElmurPPO("ElmurPolicy", DummyVecEnv([lambda: make_popgym_env(task)]), n_steps=8, batch_size=8, seed=seed,
                         policy_kwargs=dict(d_model=8, n_layers=1, n_heads=1, memory_size=2, context_length=context))
        paths.append(tmp_path / f"seed{seed}" / "model.zip")
        paths[-1].parent.mkdir()
        model.save(paths[-1])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "segment_positions.py"
    names = [str(paths[0]), str(paths[1].with_suffix(""))]  # as SB3's load, a path without .zip names the zip
    command = [sys.executable, str(script), *names, "--env", task, "--episodes", "4",
               "--n-envs", "2", "--out", str(tmp_path / "positions.md")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
            for line in (tmp_path / "positions.md").read_text().splitlines() if line.startswith("| right")}
    per_model = [rows[f"right, after the first: {Path(name).name}"] for name in names]  # model.zip, model
    assert len(rows["right, after the first, mean"]) == 4
    np.testing.assert_allclose(rows["right, after the first, mean"], np.mean(per_model, axis=0), atol=0.006)
    mixed = subprocess.run([*command[:3], str(paths[2]), *command[4:-1], str(tmp_path / "mixed.md")],
                           capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 2 and "segments differ in length ([4, 5])" in mixed.stderr
    missing = subprocess.run([*command[:3], str(tmp_path / "none.zip"), *command[4:-1], str(tmp_path / "m.md")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "none.zip: no such model file" in missing.stderr
