"""rl-zoo3 configs of zoo_configs/: their content, and training through rl-zoo3's unmodified train CLI."""

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401  (registers the policy names and T-Maze ids)
from sb3_elmur import ElmurPPO
from sb3_elmur.common.callbacks import ElmurTensorboardCallback
from sb3_elmur.common.policies import ElmurPolicy
from sb3_elmur.common.presets import (
    POPGYM_LSTM_POLICY_KWARGS,
    POPGYM_POLICY_KWARGS,
    POPGYM_PPO_KWARGS,
    TMAZE_LSTM_POLICY_KWARGS,
    TMAZE_POLICY_KWARGS,
    TMAZE_PPO_KWARGS,
)
from sb3_elmur.envs.popgym import FlattenObservationWrapper, PreviousActionWrapper

rl_zoo3 = pytest.importorskip("rl_zoo3")
yaml = pytest.importorskip("yaml")
exp_manager = pytest.importorskip("rl_zoo3.exp_manager")
zoo_utils = pytest.importorskip("rl_zoo3.utils")

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "zoo_configs"
ELMUR, LSTM, MLP = (CONFIGS / name for name in ("ppo_lstm_elmur.yml", "ppo_lstm_lstm.yml", "ppo_mlp.yml"))
ELMUR_PPO = CONFIGS / "elmur_ppo.yml"
ELMUR_PPO_KEYS = {"sequence_length", "memory_horizon"}  # what elmur_ppo.yml adds to ppo_lstm_elmur.yml
POLICY_KEYS = {"policy", "policy_kwargs", "callback"}  # what may differ between the three files
FAMILIES = (
    "Autoencode", "Battleship", "Concentration", "CountRecall", "HigherLower", "LabyrinthEscape", "LabyrinthExplore",
    "MineSweeper", "MultiarmedBandit", "NoisyPositionOnlyCartPole", "NoisyPositionOnlyPendulum", "PositionOnlyCartPole",
    "PositionOnlyPendulum", "RepeatFirst", "RepeatPrevious", "VelocityOnlyCartpole",
)  # fmt: skip
POPGYM_IDS = {f"popgym-{family}{level}-v0" for family in FAMILIES for level in ("Easy", "Medium", "Hard")}
TMAZE_IDS = {"sb3_elmur/TMaze-v0", "sb3_elmur/PassiveTMaze-v0"}
MIKASA_TASKS = (
    "BunchOfColors3", "BunchOfColors5", "BunchOfColors7", "ChainOfColors3", "ChainOfColors5", "ChainOfColors7",
    "InterceptFast", "InterceptGrabFast", "InterceptGrabMedium", "InterceptGrabSlow", "InterceptMedium",
    "InterceptSlow", "RememberColor3", "RememberColor5", "RememberColor9", "RememberShape3", "RememberShape5",
    "RememberShape9", "RememberShapeAndColor3x2", "RememberShapeAndColor3x3", "RememberShapeAndColor5x3",
    "RotateLenientPos", "RotateLenientPosNeg", "RotateStrictPos", "RotateStrictPosNeg", "SeqOfColors3", "SeqOfColors5",
    "SeqOfColors7", "ShellGamePick", "ShellGamePush", "ShellGameTouch", "TakeItBack",
)  # fmt: skip
MIKASA_IDS = {f"sb3_elmur/{task}-v0" for task in MIKASA_TASKS}  # the ManiSkillEnv ids of mikasa-robo-suite 1.0.0


def _load(path: Path) -> dict:
    with open(path) as file:
        return yaml.safe_load(file)


def _zoo_eval(text: str):
    # rl-zoo3 evaluates policy_kwargs strings in its exp_manager module's namespace.
    return eval(text, vars(exp_manager))


@pytest.mark.parametrize("path", [ELMUR, LSTM, MLP, ELMUR_PPO], ids=lambda p: p.name)
def test_config_has_default_tmaze_and_every_popgym_id(path):
    config = _load(path)
    assert set(config) == {"default"} | TMAZE_IDS | POPGYM_IDS | MIKASA_IDS
    for env_id in POPGYM_IDS:
        wrap = zoo_utils.get_wrapper_class(dict(config[env_id]))
        env = wrap(gym.make("sb3_elmur/TMaze-v0"))  # any env: checks the names import and wrap in order
        assert isinstance(env, PreviousActionWrapper) and isinstance(env.env, FlattenObservationWrapper), env_id
    for env_id in TMAZE_IDS | MIKASA_IDS | {"default"}:
        assert "env_wrapper" not in config[env_id], env_id
    for env_id in MIKASA_IDS:  # the suite's memory setting: images and joints, no oracle
        assert config[env_id]["env_kwargs"] == {"obs_mode": "rgb+joints", "image_size": 64}, env_id


def test_mikasa_ids_are_the_suite_s_ids():
    if importlib.util.find_spec("mikasa_robo_suite") is None:
        pytest.skip("mikasa-robo-suite is not installed")
    from sb3_elmur.envs.maniskill import mikasa_env_ids

    assert {f"sb3_elmur/{env_id}" for env_id in mikasa_env_ids()} == MIKASA_IDS


def test_popgym_ids_are_popgym_s_ids():
    pytest.importorskip("popgym")
    pytest.importorskip("mazelib")
    from sb3_elmur.envs.popgym import popgym_env_ids

    assert set(popgym_env_ids()) == POPGYM_IDS


def test_elmur_lstm_and_mlp_entries_differ_only_in_the_policy():
    elmur, lstm, mlp = _load(ELMUR), _load(LSTM), _load(MLP)
    for env_id in elmur:
        shared = {key: value for key, value in elmur[env_id].items() if key not in POLICY_KEYS}
        assert {k: v for k, v in lstm[env_id].items() if k not in POLICY_KEYS} == shared, env_id
        assert {k: v for k, v in mlp[env_id].items() if k not in POLICY_KEYS} == shared, env_id
        prefix = "MultiInput" if env_id in MIKASA_IDS else ""  # Dict observations
        expected = ("ElmurPolicy", "LstmPolicy", "Policy") if prefix else ("ElmurPolicy", "MlpLstmPolicy", "MlpPolicy")
        assert (elmur[env_id]["policy"], lstm[env_id]["policy"], mlp[env_id]["policy"]) == tuple(
            prefix + name for name in expected
        )
        assert zoo_utils.get_callback_list(dict(elmur[env_id]))[0].__class__ is ElmurTensorboardCallback


def test_elmur_ppo_entries_are_the_elmur_entries_plus_its_own_keys():
    elmur, elmur_ppo = _load(ELMUR), _load(ELMUR_PPO)
    for env_id, entry in elmur_ppo.items():
        assert {k: v for k, v in entry.items() if k not in ELMUR_PPO_KEYS} == elmur[env_id], env_id
        assert set(entry) >= ELMUR_PPO_KEYS, env_id


def test_tmaze_entries_are_the_presets():
    elmur, lstm = _load(ELMUR), _load(LSTM)
    for env_id in TMAZE_IDS:
        for config, policy_kwargs in ((elmur, TMAZE_POLICY_KWARGS), (lstm, TMAZE_LSTM_POLICY_KWARGS)):
            entry = config[env_id]
            assert {key: entry[key] for key in TMAZE_PPO_KWARGS} == TMAZE_PPO_KWARGS, env_id
            assert _zoo_eval(entry["policy_kwargs"]) == policy_kwargs, env_id
            assert entry["env_kwargs"] == {"corridor_length": 10}


def test_popgym_entries_are_the_comparison_presets():
    elmur, lstm, mlp = _load(ELMUR), _load(LSTM), _load(MLP)
    for env_id in POPGYM_IDS:
        for config, policy_kwargs in ((elmur, POPGYM_POLICY_KWARGS), (lstm, POPGYM_LSTM_POLICY_KWARGS), (mlp, None)):
            entry = config[env_id]
            assert {key: entry[key] for key in POPGYM_PPO_KWARGS} == POPGYM_PPO_KWARGS, env_id
            assert policy_kwargs is None or _zoo_eval(entry["policy_kwargs"]) == policy_kwargs, env_id


def test_policy_kwargs_build_the_policies():
    for path, policy in ((ELMUR, "ElmurPolicy"), (LSTM, "MlpLstmPolicy")):
        kwargs = _zoo_eval(_load(path)["default"]["policy_kwargs"])
        # An env, not the id: SB3 would pass render_mode="rgb_array", which TMazeEnv rejects.
        env = gym.make("sb3_elmur/TMaze-v0")
        model = RecurrentPPO(policy, env, policy_kwargs=kwargs, n_steps=8, batch_size=8, device="cpu")
        model.learn(8)
        assert model.policy.lstm_actor is not None and model._n_updates == model.n_epochs


def _zoo_train(
    tmp_path: Path, config: Path, env_id: str, gym_packages, *extra: str, module: str = "rl_zoo3.train",
    algo: str = "ppo_lstm",
) -> Path:
    """Run rl-zoo3's train CLI (or ``module``'s) with a tiny budget; return the saved model's path."""
    command = [
        sys.executable, "-m", *module.split(), "--algo", algo, "--env", env_id,
        "--gym-packages", *gym_packages, "-conf", str(config), "-n", "2048", "-f", str(tmp_path / "logs"),
        "--seed", "0", "--eval-freq", "1024", "--eval-episodes", "2", "--num-threads", "1",
        "-tb", str(tmp_path / "tb"), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = env_id.replace("/", "-")
    model_path = tmp_path / "logs" / algo / f"{name}_1" / f"{name}.zip"
    assert model_path.exists(), result.stdout[-3000:]
    return model_path


@pytest.fixture(scope="module")
def elmur_tmaze_run(tmp_path_factory) -> Path:
    """The README's first train command, with a tiny budget: one ELMUR run on the passive T-Maze, shared by the
    tests that load it and replay it; returns the saved model's path (``<folder>/logs/ppo_lstm/<run>/<env>.zip``)."""
    folder = tmp_path_factory.mktemp("zoo")
    return _zoo_train(folder, ELMUR, "sb3_elmur/PassiveTMaze-v0", ["sb3_elmur"], "--env-kwargs", "corridor_length:12")


def test_zoo_trains_elmur_on_tmaze_and_the_model_loads(elmur_tmaze_run):
    model_path = elmur_tmaze_run
    tmp_path = model_path.parents[3]  # where rl-zoo3 ran
    model = RecurrentPPO.load(model_path, device="cpu")
    assert isinstance(model.policy, ElmurPolicy) and model.num_timesteps == 2048
    assert model.policy.elmur_config.d_model == TMAZE_POLICY_KWARGS["d_model"]
    env = gym.make("sb3_elmur/PassiveTMaze-v0", corridor_length=12)
    obs, _ = env.reset(seed=0)
    state, start = None, np.ones(1, dtype=bool)
    for _ in range(5):
        action, state = model.predict(obs[None], state=state, episode_start=start, deterministic=True)
        obs, _, terminated, truncated, _ = env.step(int(action[0]))
        start = np.array([terminated or truncated])
    # The command line's env kwargs replaced the file's, and the memory scalars went to TensorBoard.
    with open(model_path.parent / "sb3_elmur-PassiveTMaze-v0" / "config.yml") as file:
        saved = yaml.load(file, Loader=yaml.UnsafeLoader)  # rl-zoo3 writes an OrderedDict (read the same way)
    assert saved["env_kwargs"] == {"corridor_length": 12}
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def _readme_command(module: str) -> List[str]:
    """The README's command line that runs ``python -m <module>``, as arguments (continuation lines joined)."""
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")
    lines = [line for line in readme.splitlines() if line.startswith(f"python -m {module} ")]
    assert len(lines) == 1, f"expected one `python -m {module}` command in the README, found {len(lines)}"
    return shlex.split(lines[0])[1:]


def test_readme_enjoy_command_replays_the_trained_model(elmur_tmaze_run):
    # rl-zoo3's enjoy imports requests, which its own dependencies no longer pull in (the zoo extra adds it).
    command = [sys.executable, *_readme_command("rl_zoo3.enjoy"), "-n", "40"]
    assert "--no-render" in command and command[command.index("-f") + 1] == "logs"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=elmur_tmaze_run.parents[3])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sb3_elmur-PassiveTMaze-v0_1" in result.stdout and "Episode Reward" in result.stdout, result.stdout[-3000:]


def test_zoo_trains_lstm_on_popgym_with_our_wrappers(tmp_path):
    pytest.importorskip("popgym")
    from sb3_elmur.envs.popgym import make_popgym_env

    model_path = _zoo_train(tmp_path, LSTM, "popgym-CountRecallEasy-v0", ["popgym", "sb3_elmur"])
    model = RecurrentPPO.load(model_path, device="cpu")
    env = make_popgym_env("popgym-CountRecallEasy-v0")
    assert model.observation_space == env.observation_space  # trained on the flattened, action-augmented obs
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs[None], state=None, episode_start=np.ones(1, dtype=bool))
    assert env.action_space.contains(int(action[0]))


def test_elmur_ppo_trains_and_replays_through_the_zoo_entry_point(tmp_path):
    """``python -m sb3_elmur.zoo train|enjoy --algo elmur_ppo``: rl-zoo3's own commands, ElmurPPO registered."""
    model_path = _zoo_train(tmp_path, ELMUR_PPO, "sb3_elmur/PassiveTMaze-v0", ["sb3_elmur"], "--env-kwargs",
                            "corridor_length:12", module="sb3_elmur.zoo train", algo="elmur_ppo")
    model = ElmurPPO.load(model_path, device="cpu")
    assert model.num_timesteps == 2048 and (model.sequence_length, model.memory_horizon) == (32, 16)
    command = [sys.executable, "-m", "sb3_elmur.zoo", "enjoy", "--algo", "elmur_ppo", "--env",
               "sb3_elmur/PassiveTMaze-v0", "--gym-packages", "sb3_elmur", "-f", "logs", "--exp-id", "1",
               "--no-render", "--env-kwargs", "corridor_length:12", "-n", "40"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Episode Reward" in result.stdout, result.stdout[-3000:]


def test_zoo_trains_lstm_on_a_mikasa_task(tmp_path):
    from tests.test_maniskill import _maniskill_missing

    if _maniskill_missing():
        pytest.skip(_maniskill_missing())
    # A tiny budget: 2 envs, one rollout of 32 steps each, 36 x 36 images (the smallest NatureCNN takes)
    model_path = _zoo_train(tmp_path, LSTM, "sb3_elmur/RememberColor3-v0", ["sb3_elmur.envs.maniskill"], "-n", "64",
                            "--eval-freq", "-1", "--hyperparams", "n_envs:2", "n_steps:32", "batch_size:64",
                            "--env-kwargs", "obs_mode:'rgb+joints'", "image_size:36")
    model = RecurrentPPO.load(model_path, device="cpu")
    assert set(model.observation_space.spaces) == {"rgb", "joints"} and model.num_timesteps == 64


def test_zoo_entry_point_names_its_commands(capsys):
    from sb3_elmur import zoo

    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["evaluate"])
    assert exit_info.value.code == 2 and "unknown command 'evaluate' (choose from train, enjoy)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        zoo.main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m sb3_elmur.zoo")
