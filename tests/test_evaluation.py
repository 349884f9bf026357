"""Batched T-Maze evaluation: the lean acting loop, worker processes, errors, and the tmaze_eval command."""

import json
import re
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_elmur  # noqa: F401
from sb3_elmur.common import actor
from sb3_elmur.tmaze_eval import cli as tmaze_eval  # the command: its main and the names it looks up
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.envs.tmaze import DOWN, RIGHT, UP
from sb3_elmur.common.evaluation import _actor, evaluate_success
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze, evaluate_tmaze_corridors, EvaluationWorkerError
from tests.dummy_envs import RandomLengthEnv

th.set_num_threads(1)


class RightThenUp:
    """Walks right and turns up at the junction: right for one cue only, so success is exactly 0.5."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return np.where(obs[:, 2] > 0.5, UP, RIGHT), None


class RememberTheCue:
    """Keeps the cue in its state (as a recurrent policy would) and turns towards it: always right."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        cue = np.where(episode_start, obs[:, 1], state)
        return np.where(obs[:, 2] > 0.5, np.where(cue > 0, UP, DOWN), RIGHT), cue


class FailsAtSecondRun(RightThenUp):
    """Fails when a batch of ``size`` episodes starts its second run (corridor): by ``error``, or killed by SIGKILL
    as by the out-of-memory killer."""

    def __init__(self, size: int, error: bool = False):
        self.size, self.error, self.runs = size, error, 0

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        if episode_start.all() and len(obs) == self.size:
            self.runs += 1
            if self.runs == 2 and self.error:
                raise ValueError("second run")
            if self.runs == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(obs)


class Broken:
    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        raise ValueError("no policy here")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("policy", ["ElmurPolicy", "MlpLstmPolicy"])
def test_lean_actor_matches_predict(policy, deterministic):
    """The loops that keep the state as tensors (ElmurPolicy: unpacked, with greedy actions as the argmax of
    the logits) take the same actions as ``predict`` with numpy states, across segment ends and episode starts
    (sampled actions: from the same random draws)."""
    th.manual_seed(0)
    env = TMazeVecEnv(5, corridor_length=12, seed=0)
    if policy == "ElmurPolicy":
        kwargs = dict(d_model=16, n_heads=2, n_layers=2, memory_size=2, context_length=4)
    else:
        kwargs = dict(lstm_hidden_size=16)
    model = RecurrentPPO(policy, env, policy_kwargs=kwargs, n_steps=8, seed=0)
    with th.no_grad():  # spread the logits, so that greedy actions vary from step to step
        model.policy.action_net.weight.mul_(100.0)
    act = _actor(model, deterministic=deterministic)
    rng = np.random.default_rng(0)
    state = None
    actions = []
    for step in range(60):
        obs = rng.uniform(-1, 1, size=(5, 4)).astype(np.float32)
        starts = rng.random(5) < 0.1 if step else np.ones(5, dtype=bool)
        starts[step % 5] |= step in (9, 23)  # episode starts mid-segment and at a segment start
        th.manual_seed(step)
        expected, state = model.predict(obs, state=state, episode_start=starts, deterministic=deterministic)
        th.manual_seed(step)
        actions.append(act(obs, starts))
        np.testing.assert_array_equal(actions[-1], expected)
    assert len(np.unique(actions)) > 1


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("policy", ["ElmurPolicy", "MlpLstmPolicy"])
@pytest.mark.parametrize("action_space", [spaces.Box(-0.5, 0.5, (2,), np.float32), spaces.MultiDiscrete([3, 4])])
def test_lean_actor_matches_predict_on_box_and_multidiscrete_actions(action_space, policy, deterministic):
    """Box actions come clipped to the bounds as from ``predict`` (they used to come raw: a Gaussian's mean and
    samples are unbounded), MultiDiscrete actions as one row of sub-actions per env."""
    th.manual_seed(0)
    env = DummyVecEnv([lambda: RandomLengthEnv(action_space) for _ in range(3)])
    kwargs = dict(d_model=16, n_heads=2, n_layers=1, memory_size=2, context_length=4) if policy == "ElmurPolicy" \
        else dict(lstm_hidden_size=8)
    model = RecurrentPPO(policy, env, policy_kwargs=kwargs, n_steps=8, seed=0)
    with th.no_grad():  # Box: means far outside the bounds, on both sides
        model.policy.action_net.weight.mul_(100.0)
        if isinstance(action_space, spaces.Box):
            model.policy.action_net.bias.copy_(th.tensor([3.0, -3.0]))
    act = _actor(model, deterministic=deterministic)
    rng = np.random.default_rng(0)
    state, actions = None, []
    for step in range(12):
        obs = rng.uniform(-1, 1, size=(3, 3)).astype(np.float32)
        starts = np.full(3, step == 0)
        th.manual_seed(step)
        expected, state = model.predict(obs, state=state, episode_start=starts, deterministic=deterministic)
        th.manual_seed(step)
        actions.append(act(obs, starts))
        assert actions[-1].shape == expected.shape == (3, 2)
        np.testing.assert_allclose(actions[-1], expected, rtol=0, atol=1e-6)
        assert all(action_space.contains(action.astype(action_space.dtype)) for action in actions[-1])
    if isinstance(action_space, spaces.Box):  # the clipping was exercised: actions at both bounds
        assert (np.array(actions) == 0.5).any() and (np.array(actions) == -0.5).any()
    else:
        assert len(np.unique(np.array(actions).reshape(-1, 2), axis=0)) > 1


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_workers_split_the_episodes(n_workers):
    assert evaluate_tmaze(RememberTheCue(), 30, n_episodes=10, n_workers=n_workers) == 1.0
    assert evaluate_tmaze(RightThenUp(), 30, n_episodes=10, n_workers=n_workers) == 0.5


def test_worker_errors_are_reported():
    with pytest.raises(EvaluationWorkerError, match="worker 0 failed: ValueError: no policy here"):
        evaluate_tmaze(Broken(), 5, n_episodes=4, n_workers=2)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_workers=0), "n_workers must be a positive integer, got 0"),
        (dict(n_episodes=0), "n_episodes must be a positive integer, got 0"),
        (dict(corridor_length=0), "`corridor_length` must be an int >= 1, got 0"),
        (dict(variant="active"), "`variant` must be one of"),
        (dict(deterministic="False"), "deterministic must be True or False, got 'False'"),
        (dict(compile="no"), "compile must be True or False, got 'no'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    """Checked before any episode runs (n_episodes=0 used to return nan)."""
    kwargs = {"corridor_length": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_tmaze(RightThenUp(), **kwargs)
    with pytest.raises(ValueError, match="non-empty sequence"):
        evaluate_tmaze_corridors(RightThenUp(), [])


def test_dead_worker_is_named_and_earlier_corridors_kept():
    """A worker killed by SIGKILL (as by the out-of-memory killer) after its first corridor: that corridor's result
    still comes, then an error names the worker and its signal at once (it used to wait forever), and no worker
    is left running."""
    start = time.perf_counter()
    results = evaluate_tmaze_corridors(FailsAtSecondRun(size=2), [5, 9], n_episodes=5, n_workers=2)
    assert next(results)[:2] == (5, 0.6)  # workers of 3 and 2 episodes, 3 with the cue that goes up
    with pytest.raises(EvaluationWorkerError, match=r"worker 1 was killed by signal SIGKILL \(exit code -9\) before "
                       r"finishing corridor 9.*fewer workers or fewer episodes"):
        next(results)
    assert time.perf_counter() - start < 20.0
    assert multiprocessing.active_children() == []


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run ``tmaze_eval.main`` on a model file that loads as ``model`` (no load unless one is given):
    :return: (exit status, stdout, stderr)."""
    (tmp_path / "model.zip").write_bytes(b"")

    def run(*args, model=None, path=tmp_path / "model.zip"):
        def load(algo, path, **kwargs):
            assert model is not None, "the arguments should have been refused before loading"
            return model

        monkeypatch.setattr(tmaze_eval, "load_algorithm", load)
        try:
            tmaze_eval.main([str(path), "--no-progress", *map(str, args)])
            status = 0
        except SystemExit as exit:
            status = exit.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_cli_help(cli):
    status, out, _ = cli("--help")
    assert status == 0 and out.startswith("usage: python -m sb3_elmur.tmaze_eval")
    for option in ("--algo", "--corridors", "--episodes", "--variant", "--stochastic", "--seed", "--out",
                   "--overwrite", "--workers", "--no-progress", "--compile"):
        assert option in out
    assert "(default: 100)" in out and "(default: RecurrentPPO)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "argument --workers: must be a positive integer, got '0'"),
        (["--episodes", "0"], "argument --episodes: must be a positive integer, got '0'"),
        (["--corridors", "5", "-1"], "argument --corridors: must be a positive integer, got '-1'"),
        (["--out", "{tmp}/old.json"], "old.json already exists: pass --overwrite to replace it"),
        (["--out", "{tmp}/old.json/results.json"], "cannot write --out .*old.json/results.json"),
        (["--out", "{tmp}"], "is a folder: give a file name"),
        (["--algo", "RecurrentBC"], "model file not found: .*missing.zip"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading(cli, tmp_path, args, message):
    """Refused at once with the usage line (status 2), the model not loaded, earlier results untouched."""
    (tmp_path / "old.json").write_text("earlier results")
    path = tmp_path / ("missing.zip" if "--algo" in args else "model.zip")
    status, _, err = cli(*(arg.format(tmp=tmp_path) for arg in args), path=path)
    assert status == 2 and "usage: python -m sb3_elmur.tmaze_eval" in err
    assert re.search(message, err), err
    assert (tmp_path / "old.json").read_text() == "earlier results"


def test_cli_writes_results(cli, tmp_path):
    out = tmp_path / "new" / "folder" / "results.json"
    status, stdout, _ = cli("--corridors", 5, 9, "--episodes", 4, "--out", out, model=RememberTheCue())
    assert status == 0 and "| 9 | 1.00 |" in stdout
    record = json.loads(out.read_text())
    assert record["complete"] and record["compile_seconds"] == 0.0
    assert [(row["corridor"], row["success"]) for row in record["results"]] == [(5, 1.0), (9, 1.0)]
    assert os.listdir(out.parent) == ["results.json"]  # written atomically: no temporary file left
    status, _, err = cli("--corridors", 5, "--episodes", 2, "--out", out, model=RightThenUp())
    assert status == 2 and "already exists" in err and json.loads(out.read_text()) == record
    status, _, _ = cli("--corridors", 5, "--episodes", 2, "--out", out, "--overwrite", model=RightThenUp())
    assert status == 0 and json.loads(out.read_text())["results"][0]["success"] == 0.5


class WaitsAtFirstStep(RememberTheCue):
    """Acts once ``go`` is set: a run that is still going while another one starts."""

    def __init__(self):
        self.started, self.go = threading.Event(), threading.Event()

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        self.started.set()
        assert self.go.wait(60)
        return super().predict(obs, state, episode_start, deterministic)


def test_cli_refuses_an_out_that_another_run_is_writing(cli, tmp_path):
    """Two runs on one --out used to both say "results written", the file holding one: the second refuses at once,
    the first's results are kept, and no lock file is left."""
    out = tmp_path / "results.json"
    first_model = WaitsAtFirstStep()
    first = threading.Thread(target=cli, args=("--corridors", 5, "--episodes", 2, "--out", out),
                             kwargs=dict(model=first_model))
    first.start()
    try:
        assert first_model.started.wait(60)
        assert tmaze_eval.out_lock_path(out).exists()
        for extra in ([], ["--overwrite"]):
            status, _, err = cli("--corridors", 5, "--episodes", 2, "--out", out, *extra, model=RightThenUp())
            assert status == 2 and re.search(r"results.json is being written by another tmaze_eval run \(process "
                                             rf"{os.getpid()} holds the lock .*\.results\.json\.lock\)", err), err
    finally:
        first_model.go.set()
        first.join(60)
    assert [row["success"] for row in json.loads(out.read_text())["results"]] == [1.0]  # the first run's
    assert os.listdir(tmp_path) == ["model.zip", "results.json"]
    # A run that ended since the second one's first check has written --out: checked again under the lock.
    real_check, checks = tmaze_eval.check_out, []

    def first_check_passes(path, overwrite):
        checks.append(path)
        if len(checks) > 1:
            real_check(path, overwrite)

    tmaze_eval.check_out = first_check_passes
    try:
        status, _, err = cli("--corridors", 5, "--episodes", 2, "--out", out, model=RightThenUp())
    finally:
        tmaze_eval.check_out = real_check
    assert status == 2 and "already exists" in err and len(checks) == 2


@pytest.mark.parametrize("algo", ["PPO", "RecurrentPPO"])
def test_models_of_another_env_are_refused(cli, tmp_path, algo):
    """A CartPole model scored 0.00 on the T-Maze: its spaces are checked, both sides named."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    cls = PPO if algo == "PPO" else RecurrentPPO
    policy = "MlpPolicy" if algo == "PPO" else "MlpLstmPolicy"
    model = cls(policy, gym.make("CartPole-v1"), n_steps=16, batch_size=16, seed=0)
    with pytest.raises(ValueError, match=r"the model's observation space is Box\(.*\(4,\).*the T-Maze \(passive\)'s is "
                                         r"Box\(-1.0, 1.0, \(4,\), float32\)|the model's action space is Discrete\(2\), "
                                         r"the T-Maze \(passive\)'s is Discrete\(4\)"):
        evaluate_tmaze(model, 5, n_episodes=2)
    status, _, err = cli("--corridors", 5, "--episodes", 2, "--out", tmp_path / "r.json", model=model)
    assert status == 2 and "action space is Discrete(2), the T-Maze (reference)'s is Discrete(4)" in err
    assert not (tmp_path / "r.json").exists()


class Zeros:
    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return np.zeros(len(obs), dtype=np.int64), None


def test_evaluate_success_refuses_what_would_score_zero_silently():
    """An env that never reports is_success, or max_steps <= 0, used to give a success rate of 0.0."""
    def env(n=2):
        return DummyVecEnv([lambda: RandomLengthEnv(spaces.Discrete(2), min_len=3, max_len=5) for _ in range(n)])

    # one env, so which env ends first does not depend on the episodes' random lengths
    with pytest.raises(ValueError, match=r"env 0 of DummyVecEnv ended an episode without info\['is_success'\]"):
        evaluate_success(Zeros(), env(n=1), max_steps=10)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=f"max_steps must be a positive integer, got {bad}"):
            evaluate_success(Zeros(), env(), max_steps=bad)
    model = RecurrentPPO("MlpLstmPolicy", TMazeVecEnv(2, corridor_length=3), n_steps=8, batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"the model's observation space is Box\(-1.0, 1.0, \(4,\), float32\), "
                                         r"the env DummyVecEnv's is Box\(-1.0, 1.0, \(3,\), float32\)"):
        evaluate_success(model, env(), max_steps=10)
    # an env that reports it: unfinished episodes still count as failures
    assert evaluate_success(RememberTheCue(), TMazeVecEnv(4, corridor_length=3, seed=0), max_steps=100) == 1.0
    assert evaluate_success(RememberTheCue(), TMazeVecEnv(4, corridor_length=30, seed=0), max_steps=5) == 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_keeps_results_of_a_failed_run(cli, tmp_path, workers):
    """A run that fails at its second corridor keeps the first one's results in --out ("complete": false); a
    killed worker is named without a traceback (status 1), an error in the model itself is raised as is."""
    out = tmp_path / "results.json"
    model = FailsAtSecondRun(size=2, error=workers == 1)
    episodes = 2 if workers == 1 else 5  # worker 1 of 2 runs 2 of the 5
    args = ("--corridors", 5, 9, "--episodes", episodes, "--workers", workers, "--out", out)
    if workers == 1:
        with pytest.raises(ValueError, match="second run"):
            cli(*args, model=model)
    else:
        status, _, err = cli(*args, model=model)
        assert status == 1 and "worker 1 was killed by signal SIGKILL" in err and "Traceback" not in err
        assert "results of the 1 corridor(s) done are in" in err
        assert multiprocessing.active_children() == []
    record = json.loads(out.read_text())
    assert not record["complete"] and [row["corridor"] for row in record["results"]] == [5]


@pytest.mark.parametrize("deterministic", [True, False], ids=["greedy", "sampled"])
def test_compiled_actor_matches_eager(deterministic, monkeypatch):
    """``compile=True`` (torch.compile of the mid-segment and segment-completing steps) takes the same actions as
    the eager loop, across segment ends and episode starts (sampled ones: for the same random seed), and gives
    the same success rates; evaluating two corridors compiles once, before the steps, timed apart from them."""
    th.manual_seed(0)
    env = TMazeVecEnv(4, corridor_length=12, seed=0)
    kwargs = dict(d_model=8, n_heads=2, n_layers=1, memory_size=2, context_length=3)
    model = RecurrentPPO("ElmurPolicy", env, policy_kwargs=kwargs, n_steps=8, seed=0)
    with th.no_grad():  # spread the logits, so that greedy actions vary from step to step
        model.policy.action_net.weight.mul_(100.0 if deterministic else 3.0)
    if deterministic:  # evaluate_tmaze acts greedily; first, so that its warm-up does the compiling
        compile, compiles = th.compile, []

        def counted_compile(*args, **kwargs):
            compiles.append(args)
            return compile(*args, **kwargs)

        monkeypatch.setattr(actor.th, "compile", counted_compile)
        results = list(evaluate_tmaze_corridors(model, [12, 20], n_episodes=4, compile=True))
        monkeypatch.undo()
        eager_results = list(evaluate_tmaze_corridors(model, [12, 20], n_episodes=4))
        assert [r.success for r in results] == [r.success for r in eager_results]
        assert len(compiles) == 1
        assert results[0].compile_seconds > 10 * results[0].seconds and results[1].compile_seconds == 0.0
    eager, compiled = _actor(model, deterministic), _actor(model, deterministic, compile=True)
    rng = np.random.default_rng(0)
    actions = []
    for step in range(30):
        obs = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
        starts = np.zeros(4, dtype=bool) if step else np.ones(4, dtype=bool)
        starts[step % 4] |= step in (7, 15)  # episode starts mid-segment and at a segment start
        th.manual_seed(step)
        actions.append(eager(obs, starts))
        th.manual_seed(step)
        np.testing.assert_array_equal(compiled(obs, starts), actions[-1])
    assert len(np.unique(actions)) > 1
