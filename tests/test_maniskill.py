"""ManiSkillVecEnv: SB3's VecEnv contract, episode statistics, partial resets, oracle removal, and training on a
MIKASA-Robo task. The adapter's bookkeeping is checked over a scripted simulator everywhere; the ManiSkill tests
need mani-skill, mikasa-robo-suite and a Vulkan device (``python -m sb3_elmur.envs.vulkan install``)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_elmur.envs import vulkan
from sb3_elmur.envs.maniskill import ManiSkillVecEnv, _Batch

th.set_num_threads(1)


class ScriptedBatch(_Batch):
    """Three envs whose episodes end after 2, 3 and 4 steps (env 1 by time-out, the others by termination, env 2
    successfully); reward = step of the episode; observation = (env, episode, step)."""

    lengths = (2, 3, 4)

    def __init__(self) -> None:
        self.num_envs, self.device = 3, th.device("cpu")
        self.action_space = spaces.Box(-1, 1, (2,), np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.step_count = np.zeros(3, dtype=int)
        self.episode = np.zeros(3, dtype=int)
        self.resets: List[Tuple[Optional[List[Optional[int]]], Optional[List[int]]]] = []

    def _obs(self) -> th.Tensor:
        return th.tensor(np.stack([np.arange(3), self.episode, self.step_count], axis=1), dtype=th.float32)

    def reset(self, seeds: Any, env_idx: Optional[np.ndarray]) -> th.Tensor:
        rows = np.arange(3) if env_idx is None else np.asarray(env_idx)
        self.resets.append((None if seeds is None else list(seeds), None if env_idx is None else rows.tolist()))
        self.step_count[rows] = 0
        if env_idx is not None:
            self.episode[rows] += 1
        return self._obs()[th.as_tensor(rows)]

    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        return [getattr(self, name, None)] * len(indices)

    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        setattr(self, name, value)

    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        return [getattr(self, name)(*args, **kwargs)] * len(indices)

    def render(self) -> List[np.ndarray]:
        return [np.zeros((4, 4, 3), np.uint8)] * self.num_envs

    def close(self) -> None:
        self.closed = True

    def step(self, actions: np.ndarray) -> Tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        assert actions.shape == (3, 2)
        self.step_count += 1
        ended = th.tensor(self.step_count >= np.array(self.lengths))
        truncated = ended & th.tensor([False, True, False])
        return (self._obs(), th.tensor(self.step_count, dtype=th.float32), ended & ~truncated, truncated,
                ended & th.tensor([False, False, True]))


def scripted_env() -> ManiSkillVecEnv:
    env = ManiSkillVecEnv.__new__(ManiSkillVecEnv)
    env._setup(ScriptedBatch(), device_observations=False)
    return env


def test_episode_statistics_equal_a_hand_count() -> None:
    env = scripted_env()
    env.reset()
    finished = []
    for step in range(12):
        obs, rewards, dones, infos = env.step(np.zeros((3, 2), np.float32))
        for i, info in enumerate(infos):
            assert bool(dones[i]) == ("episode" in info)  # statistics only on the step an episode ends
            if dones[i]:
                finished.append((step, i, info["episode"]["r"], info["episode"]["l"], info["is_success"],
                                 info["TimeLimit.truncated"], info["terminal_observation"].tolist(), obs[i].tolist()))
    by_hand = []
    for i, length in enumerate(ScriptedBatch.lengths):
        for episode in range(12 // length):
            by_hand.append((episode * length + length - 1, i, float(sum(range(1, length + 1))), length, i == 2, i == 1,
                            [i, episode, length], [i, episode + 1, 0]))
    assert sorted(finished) == sorted(by_hand)


def test_partial_resets_touch_only_done_envs() -> None:
    env = scripted_env()
    env.reset()
    for _ in range(4):
        env.step(np.zeros((3, 2), np.float32))
    # the first reset is of all envs; then steps 2, 3 and 4 end env 0, env 1, and envs 0 and 2
    assert [rows for _, rows in env.batch.resets] == [None, [0], [1], [0, 2]]


def test_seeds_reach_the_next_reset_only() -> None:
    env = scripted_env()
    assert env.seed(7) == [7, 8, 9]
    env.reset()
    env.reset()
    assert [seeds for seeds, _ in env.batch.resets] == [[7, 8, 9], [None, None, None]]


def test_every_mikasa_family_has_its_wrappers() -> None:
    from sb3_elmur.envs import MIKASA_FAMILIES, mikasa_family
    from sb3_elmur.envs.maniskill import _MIKASA_RENDER_WRAPPERS

    assert set(_MIKASA_RENDER_WRAPPERS) == set(MIKASA_FAMILIES)
    assert [mikasa_family(name) for name in ("RememberShapeAndColor3x2-v0", "RememberShape9-v0", "PickCube-v1")] == [
        "RememberShapeAndColor", "RememberShape", None]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="obs_mode must be one of"):
        ManiSkillVecEnv("PickCube-v1", obs_mode="depth")
    with pytest.raises(ValueError, match="n_envs must be a positive integer"):
        ManiSkillVecEnv("PickCube-v1", n_envs=0)
    with pytest.raises(ValueError, match="unknown privileged keys"):
        ManiSkillVecEnv("PickCube-v1", privileged=("answer",))
    with pytest.raises(ValueError, match="images only"):
        ManiSkillVecEnv("RememberColor3-v0", obs_mode="rgb", privileged=("oracle_info",))
    if not th.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            ManiSkillVecEnv("PickCube-v1", sim_backend="gpu")


# --- ManiSkill itself -------------------------------------------------------------------------------------------


def _maniskill_missing() -> Optional[str]:
    for module, install in (("mani_skill", "pip install -e '.[maniskill]'"),
                            ("mikasa_robo_suite", "pip install --no-deps mikasa-robo-suite==1.0.0")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    if not vulkan.activate():
        return "no Vulkan device: python -m sb3_elmur.envs.vulkan install (needs Debian's apt)"
    return None


needs_maniskill = pytest.mark.skipif(_maniskill_missing() is not None, reason=str(_maniskill_missing()))
STEPS = 50  # PickCube-v1's time limit


@pytest.fixture(scope="module")
def pick_cube() -> ManiSkillVecEnv:
    env = ManiSkillVecEnv("PickCube-v1", n_envs=2, obs_mode="state", seed=3)
    yield env
    env.close()


@needs_maniskill
def test_vec_env_contract(pick_cube: ManiSkillVecEnv) -> None:
    env = pick_cube
    assert env.observation_space.shape == (42,) and env.action_space.shape == (8,)
    env.seed(11)
    first = env.reset()
    assert first.shape == (2, 42) and first.dtype == np.float32 and env.observation_space.contains(first[0])
    env.seed(11)
    assert np.array_equal(env.reset(), first)  # seeding
    assert not np.array_equal(first[0], first[1])  # env i gets seed + i
    assert env.get_attr("control_mode") == ["pd_joint_delta_pos"] * 2
    assert env.env_method("evaluate", indices=[1])[0]["success"].shape == (1,)
    with pytest.raises(AttributeError, match="worker 0: AttributeError"):
        env.get_attr("no_such_attribute")
    env.set_attr("sb3_elmur_mark", 5, indices=[0])
    assert env.get_attr("sb3_elmur_mark", indices=0) == [5]
    assert env.env_is_wrapped(object) == [False, False]
    actions = np.zeros((2, 8), np.float32)
    for step in range(1, STEPS + 1):
        env.step_async(actions)
        obs, rewards, dones, infos = env.step_wait()
        assert rewards.shape == (2,) and dones.shape == (2,)
        assert dones.all() == (step == STEPS)
    for info in infos:  # the time limit: truncation, the last observation and the episode's statistics
        assert info["TimeLimit.truncated"] and info["episode"]["l"] == STEPS and info["is_success"] is False
        assert info["terminal_observation"].shape == (42,)
    assert not np.array_equal(obs, np.stack([info["terminal_observation"] for info in infos]))  # reset after


@needs_maniskill
def test_single_env_passes_sb3_check_env() -> None:
    import gymnasium as gym
    from stable_baselines3.common.env_checker import check_env

    env = gym.make("sb3_elmur/RememberColor3-v0", obs_mode="rgb+joints", image_size=16)
    check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    for _ in range(60):  # RememberColor's time limit
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert truncated and not terminated and info == {"is_success": False}
    env.close()


@needs_maniskill
def test_maniskill_own_adapter_reports_unfinished_episodes() -> None:
    """ManiSkill's SB3 adapter puts the running return of every env into ``info["episode"]`` on every step, so
    SB3's ``ep_info_buffer`` fills with partial returns; ours reports each episode once, when it ends."""
    import gymnasium as gym
    from mani_skill.vector.wrappers.sb3 import ManiSkillSB3VectorEnv

    raw = gym.make("PickCube-v1", num_envs=1, sim_backend="cpu", obs_mode="state")
    theirs = ManiSkillSB3VectorEnv(raw.unwrapped)  # a gym.make result fails in it under gymnasium 1.x
    ours = ManiSkillVecEnv("PickCube-v1", n_envs=1, obs_mode="state")
    counts = []
    for env in (theirs, ours):
        env.seed(0)
        env.reset()
        infos = [env.step(np.zeros((1, 8), np.float32))[3][0] for _ in range(10)]
        counts.append(sum("episode" in info for info in infos))
        env.close()
    assert counts == [10, 0]


@needs_maniskill
def test_mikasa_observations_hide_the_oracle_unless_asked() -> None:
    env = ManiSkillVecEnv("RememberColor3-v0", n_envs=1, obs_mode="rgb+joints", image_size=16, seed=0)
    obs = env.reset()
    assert set(obs) == {"rgb", "joints"} and obs["rgb"].shape == (1, 6, 16, 16) and obs["rgb"].dtype == np.uint8
    assert set(env.step(np.zeros((1, 8), np.float32))[3][0]) == set()  # no raw info (it holds the oracle too)
    env.close()
    env = ManiSkillVecEnv("RememberColor3-v0", n_envs=1, obs_mode="rgb+joints", image_size=16, seed=0,
                          privileged=("oracle_info",))
    obs = env.reset()
    assert set(obs) == {"rgb", "joints", "oracle_info"}
    assert obs["oracle_info"][0, 0] == float(env.get_attr("oracle_info")[0][0])  # the colour to find
    env.close()
    state = ManiSkillVecEnv("RememberColor3-v0", n_envs=1, obs_mode="state", seed=0)
    assert state.observation_space.shape == (35,)  # the task's state vector (which itself reveals the colour)
    state.close()


@needs_maniskill
def test_remember_color_memory_state_shows_the_colour_only_at_the_start() -> None:
    """``memory_state``: joints, TCP pose and each cube's position and visibility by colour. The target cube alone
    in the first steps (the cue), none during the delay, all of them on the table after it (on the CPU backend
    the suite leaves them hidden: :class:`~sb3_elmur.envs.maniskill.mikasa._CubesReturnOnCpu` puts them back)."""
    env = ManiSkillVecEnv("RememberColor3-v0", n_envs=1, obs_mode="memory_state", seed=0)
    visible = [env.reset()[0, 25:].reshape(3, 4)[:, 3]]
    target = int(env.get_attr("oracle_info")[0][0])  # this episode's colour
    for _ in range(15):
        visible.append(env.step(np.zeros((1, 8), np.float32))[0][0, 25:].reshape(3, 4)[:, 3])
    visible = np.array(visible)
    cue, delay, choice = visible[:5], visible[5:10], visible[10:]
    assert (cue == np.eye(3)[target]).all() and (delay == 0).all() and (choice == 1).all()
    env.close()
    with pytest.raises(ValueError, match="defined for the RememberColor tasks"):
        ManiSkillVecEnv("TakeItBack-v0", obs_mode="memory_state")


@needs_maniskill
def test_a_task_without_its_assets_is_named() -> None:
    from sb3_elmur.envs.maniskill import MissingAssetsError, check_task

    try:
        check_task("ShellGameTouch-v0")
    except MissingAssetsError as error:
        assert "ycb" in str(error) and "ShellGameTouch-v0" in str(error)
    else:
        pytest.skip("the YCB assets are on this machine")
    with pytest.raises(Exception, match="neither a ManiSkill nor a MIKASA-Robo task"):
        check_task("NoSuchTask-v9")


@needs_maniskill
def test_render_gives_one_frame_per_env() -> None:
    env = ManiSkillVecEnv("PickCube-v1", n_envs=2, obs_mode="state", render_mode="rgb_array")
    env.reset()
    frames = env.get_images()
    assert len(frames) == 2 and frames[0].ndim == 3 and frames[0].shape[-1] == 3 and frames[0].dtype == np.uint8
    assert env.render().ndim == 3  # SB3 tiles them
    env.close()


_PREDICT_IN_NEW_PROCESS = """
import sys, numpy as np, torch
torch.set_num_threads(1)
import sb3_elmur
from sb3_contrib import RecurrentPPO
model = RecurrentPPO.load(sys.argv[1], device="cpu")
data = np.load(sys.argv[2])
obs = {"rgb": data["rgb"], "joints": data["joints"]}
actions, _ = model.predict(obs, state=None, episode_start=np.ones(len(data["rgb"]), bool), deterministic=True)
np.save(sys.argv[3], actions)
"""


@needs_maniskill
# The LSTM on the adapter is in the default suite through rl-zoo3 (test_zoo_trains_lstm_on_a_mikasa_task); this
# form of it, a minute of CPU rendering, runs with -m slow.
@pytest.mark.parametrize("policy", ["MultiInputElmurPolicy", pytest.param("MultiInputLstmPolicy", marks=pytest.mark.slow)])
def test_recurrent_ppo_trains_on_a_mikasa_task_saves_and_loads_in_a_new_process(policy: str, tmp_path) -> None:
    import sb3_elmur  # noqa: F401
    from sb3_contrib import RecurrentPPO

    # 36 x 36: the smallest image SB3's NatureCNN takes
    env = ManiSkillVecEnv("RememberColor3-v0", n_envs=2, obs_mode="rgb+joints", image_size=36, seed=0)
    policy_kwargs = (dict(d_model=32, n_layers=1, memory_size=2, context_length=10) if "Elmur" in policy
                     else dict(lstm_hidden_size=32))
    # Two rollouts of 32 steps: every env step renders on the CPU
    model = RecurrentPPO(policy, env, n_steps=32, batch_size=64, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
    model.learn(128)
    assert model.num_timesteps == 128
    model.save(tmp_path / "model")
    obs = env.reset()
    env.close()
    expected, _ = model.predict(obs, state=None, episode_start=np.ones(2, bool), deterministic=True)
    np.savez(tmp_path / "obs.npz", **obs)
    subprocess.run([sys.executable, "-c", _PREDICT_IN_NEW_PROCESS, str(tmp_path / "model.zip"),
                    str(tmp_path / "obs.npz"), str(tmp_path / "actions.npy")], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "actions.npy"), expected, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not th.cuda.is_available() or _maniskill_missing() is not None, reason="needs CUDA and ManiSkill")
def test_gpu_simulation_keeps_observations_on_the_device() -> None:
    from sb3_elmur import ElmurPPO

    env = ManiSkillVecEnv("PickCube-v1", n_envs=16, obs_mode="state", sim_backend="gpu", device_observations=True)
    obs = env.reset()
    assert isinstance(obs, th.Tensor) and obs.device.type == "cuda" and obs.shape == (16, 42)
    model = ElmurPPO("ElmurPolicy", env, n_steps=64, batch_size=256, n_epochs=1, device="cuda", seed=0,
                     policy_kwargs=dict(d_model=32, n_layers=1))
    model.learn(2048)
    assert model.num_timesteps >= 2048
    env.close()


@needs_maniskill
def test_compare_runs_mikasa_ids_on_the_adapter() -> None:
    from sb3_elmur.compare import make_env

    spec = dict(env_id="RememberColor3-v0", gym_packages=[], wrappers=[],
                env_kwargs=dict(obs_mode="rgb+joints", image_size=16, reward_mode="sparse"))
    env = make_env(spec, n_envs=1, seed=0)
    assert isinstance(env, ManiSkillVecEnv) and set(env.observation_space.spaces) == {"rgb", "joints"}
    assert env.get_attr("reward_mode") == ["sparse"]
    env.close()
    with pytest.raises(ValueError, match="takes no gym wrappers"):
        make_env({**spec, "wrappers": ["sb3_elmur.envs.popgym.PreviousActionWrapper"]}, n_envs=1, seed=0)


@pytest.mark.slow
@needs_maniskill
def test_gpu_benchmark_dry_run_trains_saves_and_resumes(tmp_path) -> None:
    """``benchmarks/maniskill_gpu.py --dry-run``: the GPU run's code on the CPU backend, tiny. Slow (80 s, three
    processes that each start ManiSkill): run it before a device session, with ``pytest -m slow -k dry_run``."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "maniskill_gpu.py"
    command = [sys.executable, str(script), "--dry-run", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path, timeout=300)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert [p["timesteps"] for p in progress] == [16, 32] and (tmp_path / "model.zip").exists()
    again = subprocess.run(command + ["--timesteps", "48"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "resuming from" in again.stdout
    assert again.stdout.split("resuming from", 1)[1].splitlines()[1].startswith("| env steps | env steps/s |")  # header
    assert [p["timesteps"] for p in json.loads((tmp_path / "progress.json").read_text())] == [16, 32, 48]
    other = subprocess.run(command + ["--policy", "lstm"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert other.returncode == 2 and "holds a run with other settings" in other.stderr
