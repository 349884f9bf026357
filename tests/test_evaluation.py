"""Batched T-Maze evaluation: the lean acting loop, worker processes, and errors."""

import numpy as np
import pytest
import torch as th
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.envs.tmaze import DOWN, RIGHT, UP
from sb3_elmur.evaluation import _actor, evaluate_tmaze


class RightThenUp:
    """Walks right and turns up at the junction: right for one cue only, so success is exactly 0.5."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        return np.where(obs[:, 2] > 0.5, UP, RIGHT), None


class RememberTheCue:
    """Keeps the cue in its state (as a recurrent policy would) and turns towards it: always right."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        cue = np.where(episode_start, obs[:, 1], state)
        return np.where(obs[:, 2] > 0.5, np.where(cue > 0, UP, DOWN), RIGHT), cue


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


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_workers_split_the_episodes(n_workers):
    assert evaluate_tmaze(RememberTheCue(), 30, n_episodes=10, n_workers=n_workers) == 1.0
    assert evaluate_tmaze(RightThenUp(), 30, n_episodes=10, n_workers=n_workers) == 0.5


def test_worker_errors_are_reported():
    with pytest.raises(RuntimeError, match="worker 0 failed: ValueError: no policy here"):
        evaluate_tmaze(Broken(), 5, n_episodes=4, n_workers=2)
    with pytest.raises(ValueError, match="n_workers must be a positive integer"):
        evaluate_tmaze(RightThenUp(), 5, n_workers=0)


@pytest.mark.parametrize("deterministic", [True, False], ids=["greedy", "sampled"])
def test_compiled_actor_matches_eager(deterministic):
    """``compile=True`` (torch.compile of the mid-segment and segment-completing steps) takes the same actions as
    the eager loop, across segment ends and episode starts (sampled ones: for the same random seed), and gives
    the same success rate."""
    th.manual_seed(0)
    env = TMazeVecEnv(4, corridor_length=12, seed=0)
    kwargs = dict(d_model=8, n_heads=2, n_layers=1, memory_size=2, context_length=3)
    model = RecurrentPPO("ElmurPolicy", env, policy_kwargs=kwargs, n_steps=8, seed=0)
    with th.no_grad():  # spread the logits, so that greedy actions vary from step to step
        model.policy.action_net.weight.mul_(100.0 if deterministic else 3.0)
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
    if deterministic:  # evaluate_tmaze acts greedily
        success = evaluate_tmaze(model, 12, n_episodes=4, variant="passive")
        assert evaluate_tmaze(model, 12, n_episodes=4, variant="passive", compile=True) == success
