"""sb3_elmur.export: the exported step (ONNX through onnxruntime, TorchScript) acts as ``predict`` does and values as
the policy's ``forward``, step for step over episodes of several segments (memory writes, slot overwrites and
episode starts in the middle included), for every policy kind and action space; the runner needs neither torch nor
SB3; bad input gets a named error.

ONNX exports take several seconds each, so the default cases export four ONNX files (each action space and each policy
kind at least once) and TorchScript for the whole matrix; ``-m slow`` runs the whole matrix in both formats over
10,000-step episodes."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO, RecurrentBC
from sb3_elmur.export import UnsupportedModelError, export_policy, read_description
from sb3_elmur.export.cli import main as export_main
from sb3_elmur.export.runner import OnnxPolicy
from sb3_elmur.export.verify import file_runner
from tests.dummy_envs import RandomLengthEnv
from tests.test_maniskill import needs_maniskill

torch.set_num_threads(1)
# The tests load TorchScript files themselves: torch deprecates TorchScript (docs/export.md), nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

K = 4  # context_length: several segments, and (memory_size 2) slot overwrites, in a short episode
SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=K, alpha=0.5, memory_init_std=0.5)
VECTOR = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)  # CartPole's shape: the runner test steps CartPole
IMAGE = spaces.Box(0, 255, (36, 36, 1), dtype=np.uint8)  # channel-last: the algorithms transpose it
DICT = spaces.Dict({"position": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "flag": spaces.Discrete(3)})
OBSERVATIONS = {"ElmurPolicy": VECTOR, "CnnElmurPolicy": IMAGE, "MultiInputElmurPolicy": DICT}
ACTIONS = {
    "Discrete": spaces.Discrete(2),
    "Box": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32),
    "MultiDiscrete": spaces.MultiDiscrete([2, 3]),
    "MultiBinary": spaces.MultiBinary(3),
}
ALGORITHMS = {"RecurrentPPO": RecurrentPPO, "ElmurPPO": ElmurPPO, "RecurrentBC": RecurrentBC}
RUNNER = Path(sb3_elmur.__file__).parent / "export" / "runner.py"
# Episode starts of the default episodes: every row at step 0, row 1 mid-segment (step 9), row 2 at a segment's
# last position (step 15), so the rows' segments and memory writes fall at different steps.
STEPS, RESTARTS = 6 * K, {9: 1, 15: 2}


def _zip(tmp_path: Path, policy: str, action: str, algorithm: str = "RecurrentPPO", head_std: float = 1.0,
         **policy_kwargs: Any) -> Path:
    """A model of ``algorithm`` with random weights of std ``head_std`` in its heads (greedy actions that vary with the
    latent: SB3's initial action head is near zero), saved."""
    env = make_vec_env(RandomLengthEnv, n_envs=1, seed=0,
                       env_kwargs=dict(action_space=ACTIONS[action], observation_space=OBSERVATIONS[policy]))
    kwargs = dict(n_steps=16, batch_size=16) if algorithm != "RecurrentBC" else {}
    model = ALGORITHMS[algorithm](policy, env, seed=0, policy_kwargs={**SMALL, **policy_kwargs}, **kwargs)
    with torch.no_grad():
        for head in (model.policy.action_net, model.policy.value_net):
            for parameter in head.parameters():
                parameter.normal_(0.0, head_std)
    path = tmp_path / f"{algorithm}_{policy}_{action}.zip"
    model.save(path)
    return path


def _policy(path: Path):
    """The policy as its algorithm's ``load`` gives it (the reference of the comparisons)."""
    return ALGORITHMS[path.name.split("_")[0]].load(path, device="cpu").policy


def _observations(space: spaces.Space, n_steps: int, batch: int, seed: int = 0) -> List[Any]:
    space.seed(seed)
    if isinstance(space, spaces.Dict):
        return [{key: np.stack([space[key].sample() for _ in range(batch)]) for key in space.spaces}
                for _ in range(n_steps)]
    return [np.stack([space.sample() for _ in range(batch)]) for _ in range(n_steps)]


def _starts(n_steps: int, batch: int, restarts: Dict[int, int]) -> np.ndarray:
    starts = np.zeros((n_steps, batch), dtype=bool)
    starts[0] = True
    for step, row in restarts.items():
        starts[step, row] = True
    return starts


def _reference(policy, observations: List[Any], starts: np.ndarray) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Actions of ``predict`` (deterministic) and values of ``forward``, step by step with their states carried."""
    batch = starts.shape[1]
    zeros = lambda lstm: (torch.zeros(1, batch, lstm.hidden_size),) * 2  # noqa: E731  (fresh rows)
    critic = policy.lstm_critic if policy.lstm_critic is not None else policy.lstm_actor
    forward_state = RNNStates(zeros(policy.lstm_actor), zeros(critic))
    predict_state, actions, values = None, [], []
    for obs, start in zip(observations, starts):
        action, predict_state = policy.predict(obs, predict_state, episode_start=start.astype(np.float32),
                                               deterministic=True)
        with torch.no_grad():
            _, value, _, forward_state = policy.forward(policy.obs_to_tensor(obs)[0], forward_state,
                                                        torch.as_tensor(start, dtype=torch.float32), deterministic=True)
        actions.append(action)
        values.append(value[:, 0].numpy())
    return actions, values


def _exported(run: Callable[[List[np.ndarray]], List[np.ndarray]], path: Path, observations: List[Any],
              starts: np.ndarray) -> Tuple[List[np.ndarray], List[np.ndarray], Dict[str, np.ndarray]]:
    """Actions, values and the final state of the exported file, its state fed back at every step."""
    description = read_description(path)
    inputs = description["inputs"]
    batch = starts.shape[1]
    state = {spec["name"]: np.zeros((batch, *spec["shape"][1:]), spec["dtype"]) for spec in inputs
             if not spec["name"].startswith("obs") and spec["name"] not in ("episode_start", "noise")}
    actions, values = [], []
    for obs, start in zip(observations, starts):
        feeds = dict(state, episode_start=start)
        if isinstance(obs, dict):
            feeds.update({f"obs.{key}": value for key, value in obs.items()})
        else:
            feeds["obs"] = obs
        outputs = run([np.asarray(feeds[spec["name"]], dtype=spec["dtype"]) for spec in inputs])
        named = dict(zip([spec["name"] for spec in description["outputs"]], outputs))
        state = {name: named[f"{name}_out"] for name in state}
        actions.append(named["action"])
        values.append(named["value"])
    return actions, values, state


def _assert_matches(reference, exported, action_space: spaces.Space) -> float:
    """Equal actions (to 1e-5 for Box) and values (1e-5) at every step; :return: the largest difference."""
    largest = 0.0
    for t, (expected, got) in enumerate(zip(reference[0], exported[0])):
        assert got.shape == expected.shape, (t, got.shape, expected.shape)
        if isinstance(action_space, spaces.Box):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"step {t}")
            largest = max(largest, float(np.abs(got - expected).max()))
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"step {t}")
    for t, (expected, got) in enumerate(zip(reference[1], exported[1])):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"value at step {t}")
        largest = max(largest, float(np.abs(got - expected).max()))
    return largest


def _check_episode(zip_path: Path, out: Path, fmt: str, n_steps: int = STEPS, restarts: Dict[int, int] = RESTARTS,
                   batch: int = 3, **export_kwargs: Any) -> Tuple[float, Dict[str, np.ndarray]]:
    description = export_policy(zip_path, out, format=fmt, **export_kwargs)
    policy = _policy(zip_path)
    observations = _observations(policy.observation_space, n_steps, batch)
    starts = _starts(n_steps, batch, restarts)
    run = file_runner(out, fmt, [spec["name"] for spec in description["inputs"]])
    exported = _exported(run, out, observations, starts)
    return _assert_matches(_reference(policy, observations, starts), exported, policy.action_space), exported[2]


def _assert_memory_was_written(state: Dict[str, np.ndarray], n_steps: int = STEPS) -> None:
    # Row 0 ran the whole episode: every slot written, and the oldest overwritten (LRU) at a later segment's end.
    positions = state["positions"][0]
    assert (positions >= 0).all() and positions.max() == (n_steps // K) * K - 1 and state["step"][0] == n_steps


# ONNX: each action space and each policy kind (and algorithm) at least once.
ONNX_CASES = [
    ("RecurrentPPO", "ElmurPolicy", "Discrete"),
    ("ElmurPPO", "MultiInputElmurPolicy", "Box"),
    ("RecurrentBC", "CnnElmurPolicy", "MultiDiscrete"),
    ("RecurrentPPO", "MultiInputElmurPolicy", "MultiBinary"),
]


@pytest.mark.parametrize("algorithm, policy, action", ONNX_CASES)
def test_onnx_step_equals_predict_over_an_episode(tmp_path, algorithm, policy, action):
    # The third case with a fixed batch size, the others dynamic (exported at 2 rows, run at 3).
    batch_size = 3 if algorithm == "RecurrentBC" else None
    _, state = _check_episode(_zip(tmp_path, policy, action, algorithm), tmp_path / "policy.onnx", "onnx",
                              batch_size=batch_size)
    _assert_memory_was_written(state)


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("policy", list(OBSERVATIONS))
def test_torchscript_step_equals_predict_over_an_episode(tmp_path, policy, action):
    _, state = _check_episode(_zip(tmp_path, policy, action), tmp_path / "policy.pt", "torchscript")
    _assert_memory_was_written(state)


def test_separate_critic_backbone_exports_its_own_state(tmp_path):
    zip_path = _zip(tmp_path, "ElmurPolicy", "Box", shared_backbone=False)
    _, state = _check_episode(zip_path, tmp_path / "policy.pt", "torchscript")
    assert {"critic_memory", "critic_cache"} <= set(state)
    _assert_memory_was_written(state)


def test_channel_last_images_are_transposed_in_the_graph(tmp_path):
    zip_path = _zip(tmp_path, "CnnElmurPolicy", "Discrete")
    out = tmp_path / "policy.pt"
    description = export_policy(zip_path, out, format="torchscript", channels_last=True)
    assert description["inputs"][0]["shape"] == ["batch", 36, 36, 1]
    policy = _policy(zip_path)
    observations = _observations(IMAGE, STEPS, 2)  # as the env gives them; predict transposes them itself
    starts = _starts(STEPS, 2, {9: 1})
    run = file_runner(out, "torchscript", [spec["name"] for spec in description["inputs"]])
    _assert_matches(_reference(policy, observations, starts), _exported(run, out, observations, starts),
                    policy.action_space)


def _noise_reference(distribution, noise: np.ndarray, action_space: spaces.Space) -> np.ndarray:
    """The action that the documented sampler draws from ``noise``, computed in numpy from the distribution."""
    u = np.clip(noise.astype(np.float64), 1e-12, 1 - 2.0**-24)
    if isinstance(action_space, spaces.Discrete):
        return np.argmax(distribution.distribution.logits.numpy() - np.log(-np.log(u)), axis=1)
    if isinstance(action_space, spaces.MultiDiscrete):
        parts = np.split(u, np.cumsum(action_space.nvec)[:-1], axis=1)
        return np.stack([np.argmax(d.logits.numpy() - np.log(-np.log(p)), axis=1)
                         for d, p in zip(distribution.distribution, parts)], axis=1)
    if isinstance(action_space, spaces.MultiBinary):
        return (u < distribution.distribution.probs.numpy()).astype(np.float32)
    u1, u2 = np.split(u, 2, axis=1)
    normal = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    sample = distribution.distribution.mean.numpy() + distribution.distribution.stddev.numpy() * normal
    return np.clip(sample, action_space.low, action_space.high)


@pytest.mark.parametrize("action", list(ACTIONS))
def test_stochastic_step_samples_from_the_policy_distribution_with_the_given_noise(tmp_path, action):
    zip_path = _zip(tmp_path, "ElmurPolicy", action)
    out = tmp_path / "policy.pt"
    description = export_policy(zip_path, out, format="torchscript", deterministic=False)
    policy = _policy(zip_path)
    batch, rng = 3, np.random.default_rng(0)
    observations, starts = _observations(VECTOR, STEPS, batch), _starts(STEPS, batch, RESTARTS)
    module = torch.jit.load(str(out))
    state = [torch.as_tensor(np.zeros((batch, *spec["shape"][1:]), spec["dtype"]))
             for spec in description["inputs"][1:-2]]
    lstm_states = (torch.zeros(1, batch, policy.lstm_actor.hidden_size),) * 2
    for obs, start in zip(observations, starts):
        noise = rng.random((batch, description["noise_size"]), dtype=np.float32)
        with torch.no_grad():
            action_out, _, *state = module(torch.as_tensor(obs), *state, torch.as_tensor(start), torch.as_tensor(noise))
            distribution, lstm_states = policy.get_distribution(
                torch.as_tensor(obs), lstm_states, torch.as_tensor(start, dtype=torch.float32))
        expected = _noise_reference(distribution, noise, policy.action_space).reshape(action_out.shape)
        np.testing.assert_allclose(action_out.numpy(), expected, atol=1e-5, rtol=0)


def test_sampled_actions_follow_the_action_probabilities(tmp_path):
    """Many rows with one observation and fresh state: the frequency of each sampled action is its probability."""
    zip_path = _zip(tmp_path, "ElmurPolicy", "Discrete", head_std=0.1)
    out = tmp_path / "policy.pt"
    export_policy(zip_path, out, format="torchscript", deterministic=False)
    policy, batch = _policy(zip_path), 20_000
    obs = np.repeat(_observations(VECTOR, 1, 1)[0], batch, axis=0)
    fresh = (torch.zeros(1, 1, policy.lstm_actor.hidden_size),) * 2
    with torch.no_grad():
        distribution, _ = policy.get_distribution(torch.as_tensor(obs[:1]), fresh, torch.ones(1))
    probs = distribution.distribution.probs.numpy()[0]
    assert 0.05 < probs.min()  # the check below says something about every action
    inputs = [torch.as_tensor(x) for x in (obs, *_zero_state(read_description(out), batch))]
    noise = torch.as_tensor(np.random.default_rng(1).random((batch, 2), dtype=np.float32))
    with torch.no_grad():
        actions = torch.jit.load(str(out))(*inputs, torch.ones(batch, dtype=torch.bool), noise)[0].numpy()
    frequencies = np.bincount(actions, minlength=2) / batch
    np.testing.assert_allclose(frequencies, probs, atol=4 * np.sqrt(0.25 / batch))


def _zero_state(description: Dict[str, Any], batch: int) -> List[np.ndarray]:
    return [np.zeros((batch, *spec["shape"][1:]), spec["dtype"]) for spec in description["inputs"]
            if not spec["name"].startswith("obs") and spec["name"] not in ("episode_start", "noise")]


@pytest.fixture(scope="module")
def cartpole_onnx(tmp_path_factory):
    """A stochastic ONNX file of CartPole's spaces (Box(4), Discrete(2)), exported by the command line."""
    folder = tmp_path_factory.mktemp("cartpole")
    out = folder / "policy.onnx"
    export_main([str(_zip(folder, "ElmurPolicy", "Discrete")), "--format", "onnx", "--out", str(out), "--stochastic"])
    return out


def test_command_line_checks_the_file_and_describes_it(cartpole_onnx, capsys):
    description = read_description(cartpole_onnx)
    assert not description["deterministic"] and description["noise_size"] == 2 and description["batch_size"] is None
    assert [spec["name"] for spec in description["inputs"]] == [
        "obs", "memory", "positions", "segment", "step", "cache", "episode_start", "noise"]
    assert [spec["name"] for spec in description["outputs"]] == [
        "action", "value", "memory_out", "positions_out", "segment_out", "step_out", "cache_out"]
    assert description["inputs"][1]["shape"] == ["batch", 2, 2, 16]


def test_runner_steps_an_env_without_torch_or_sb3(cartpole_onnx):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('runner', {str(RUNNER)!r})\n"
        "runner = importlib.util.module_from_spec(spec); spec.loader.exec_module(runner)\n"
        f"episodes = runner.main([{str(cartpole_onnx)!r}, '--env', 'CartPole-v1', '--episodes', '2'])\n"
        "assert len(episodes) == 2 and all(e['length'] > 0 for e in episodes), episodes\n"
        "loaded = sorted(m for m in ('torch', 'stable_baselines3', 'sb3_contrib', 'sb3_elmur') if m in sys.modules)\n"
        "print('loaded:', loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout and "mean return" in result.stdout, result.stdout


def test_runner_seeds_its_noise_and_checks_shapes(cartpole_onnx):
    obs = np.zeros((1, 4), np.float32)
    first, second = OnnxPolicy(str(cartpole_onnx), seed=3), OnnxPolicy(str(cartpole_onnx), seed=3)
    assert [int(first.act(obs)[0][0]) for _ in range(20)] == [int(second.act(obs)[0][0]) for _ in range(20)]
    assert first.state["step"][0] == 20
    first.reset()
    first.act(obs)
    assert first.state["step"][0] == 1  # reset inside the step
    with pytest.raises(ValueError, match=r"obs has shape \(1, 3\), the policy takes \(1, 4\)"):
        first.act(np.zeros((1, 3), np.float32))


def test_fixed_batch_size_is_fixed_in_the_onnx_file(tmp_path):
    out = tmp_path / "policy.onnx"
    export_policy(_zip(tmp_path, "ElmurPolicy", "Discrete"), out, format="onnx", batch_size=2)
    assert read_description(out)["batch_size"] == 2
    with pytest.raises(ValueError, match="exported for batch size 2, not 1"):
        OnnxPolicy(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 4]
    policy = OnnxPolicy(str(out), batch_size=2)
    assert policy.act(np.zeros((2, 4), np.float32))[0].shape == (2,)


@pytest.mark.parametrize("kind", ["ppo", "lstm", "not_a_zip"])
def test_other_layouts_get_a_named_error(tmp_path, kind):
    path = tmp_path / f"{kind}.zip"
    if kind == "not_a_zip":
        path.write_text("not a model")
        expected = "is not a readable saved model"
    else:
        env = RandomLengthEnv(spaces.Discrete(2))
        model = PPO("MlpPolicy", env, n_steps=16, batch_size=16) if kind == "ppo" else \
            RecurrentPPO("MlpLstmPolicy", env, n_steps=16, batch_size=16)
        model.save(path)
        expected = "ActorCriticPolicy policy, not an ElmurPolicy" if kind == "ppo" else "holds an LSTM policy"
    with pytest.raises(UnsupportedModelError, match=expected):
        export_policy(path, tmp_path / "policy.pt", format="torchscript")
    assert not (tmp_path / "policy.pt").exists()


def _cli_error(capsys, argv: List[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_command_line_names_bad_input(tmp_path, capsys):
    zip_path = _zip(tmp_path, "ElmurPolicy", "Discrete")
    out = tmp_path / "policy.pt"
    assert "invalid choice: 'tflite'" in _cli_error(capsys, [str(zip_path), "--format", "tflite", "--out", str(out)])
    missing = tmp_path / "missing.zip"
    assert f"model file not found: {missing}" in _cli_error(capsys, [str(missing), "--format", "onnx", "--out", str(out)])
    export_main([str(zip_path), "--format", "torchscript", "--out", str(out), "--check-steps", "5"])
    written = out.stat().st_mtime_ns
    assert "already exists: pass --overwrite" in _cli_error(
        capsys, [str(zip_path), "--format", "torchscript", "--out", str(out)])
    assert out.stat().st_mtime_ns == written
    time.sleep(0.01)
    export_main([str(zip_path), "--format", "torchscript", "--out", str(out), "--overwrite", "--stochastic"])
    assert not read_description(out)["deterministic"]
    assert "no channel-first image" in _cli_error(
        capsys, [str(zip_path), "--format", "torchscript", "--out", str(tmp_path / "x.pt"), "--channels-last"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([zip_path.name, out.name])  # no leftovers


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("policy", list(OBSERVATIONS))
def test_exported_step_equals_predict_over_10000_steps(tmp_path, policy, action, fmt):
    """The issue's target: 10,000-step episodes (2,500 segments), a second episode starting in the middle of a segment
    for one row; prints the largest difference for the record (benchmarks/results/export_speed.md)."""
    n_steps = 10_000
    largest, state = _check_episode(_zip(tmp_path, policy, action), tmp_path / f"policy.{fmt}", fmt, n_steps=n_steps,
                                    restarts={5_001: 1}, batch=2)
    _assert_memory_was_written(state, n_steps)
    print(json.dumps({"policy": policy, "action": action, "format": fmt, "largest_difference": largest}))


@needs_maniskill
def test_mikasa_example_replays_the_exported_policy_as_predict_acts(tmp_path):
    """``examples/export_mikasa.py``: ElmurPPO trains on RememberColor3 (RGB + joints), the ONNX export replays a whole
    episode (60 steps, six segments) through the runner's OnnxPolicy with the actions ``predict`` takes."""
    example = Path(__file__).resolve().parents[1] / "examples" / "export_mikasa.py"
    result = subprocess.run([sys.executable, str(example), "--timesteps", "64", "--n-envs", "1", "--episodes", "1",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inputs: obs.joints, obs.rgb, memory, " in result.stdout
    replay = result.stdout.strip().splitlines()[-1]
    assert replay.startswith("RememberColor3-v0: replayed 1 episodes (60 steps each on average) ") and "after 64 env" in replay
    assert float(replay.rsplit("from predict ", 1)[1]) <= 1e-5
    assert read_description(tmp_path / "elmur_mikasa.onnx")["batch_size"] is None and (tmp_path / "elmur_mikasa.zip").exists()
