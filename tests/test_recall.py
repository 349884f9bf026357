"""The noisy recall task: its rules, the oracle and its dataset (issue 14's length-generalization benchmark)."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env

import sb3_elmur  # noqa: F401  (registers sb3_elmur/NoisyRecall-v0)
from sb3_elmur.bc.collect import make_recall_dataset
from sb3_elmur.envs import NoisyRecallEnv, NoisyRecallVecEnv, RecallOracle


def test_single_env_passes_check_env_and_scores_only_the_last_answer():
    env = gym.make("sb3_elmur/NoisyRecall-v0", n_cues=3, length=5, noise_dims=2)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=0)
    cue = int(obs[:3].argmax())
    assert obs[:3].sum() == 1 and obs[3] == 0 and obs.shape == (6,)
    rewards = []
    for t in range(5):
        obs, reward, terminated, truncated, info = env.step((cue + 1) % 3 if t < 4 else cue)  # wrong until the query
        rewards.append(reward)
        if t < 4:
            assert (obs[:3] == 0).all() and obs[3] == (t == 3) and not terminated  # the query flag at the last step
    assert rewards == [0, 0, 0, 0, 1] and terminated and not truncated and info == {"is_success": True}
    with pytest.raises(ValueError, match="invalid action"):
        env.step(7)


@pytest.mark.parametrize("wait", [False, True])
def test_oracle_succeeds_at_any_length_and_the_vec_env_resets_done_envs(wait):
    env = NoisyRecallVecEnv(4, length=(2, 1000), wait=wait, seed=1)
    assert env.action_space.n == 3 + wait
    obs, oracle, state = env.reset(), RecallOracle(3, wait=wait), None
    successes, terminal = [], 0
    while len(successes) < 20:
        actions, state = oracle.predict(obs, state)
        obs, rewards, dones, infos = env.step(actions)
        for info, done in zip(infos, dones):
            if done:
                successes.append(info["is_success"])
                terminal += info["terminal_observation"].shape == (8,)
    assert all(successes) and terminal == len(successes)
    assert (obs[dones][:, :3].sum(axis=1) == 1).all()  # the done envs show their new cue at once


def test_seeded_vec_envs_repeat_their_episodes():
    a, b = NoisyRecallVecEnv(3, seed=5), NoisyRecallVecEnv(3)
    b.seed(5)
    np.testing.assert_array_equal(a.reset(), b.reset())


def test_dataset_holds_whole_oracle_episodes():
    dataset = make_recall_dataset(50, n_cues=3, length=(3, 12), noise_dims=2, seed=0)
    lengths = [len(ep) for ep in dataset.episodes]
    assert len(dataset) == 50 and min(lengths) >= 3 and max(lengths) <= 12
    for ep in dataset.episodes:
        cue = ep.observations[0, :3].argmax()
        assert (ep.actions == cue).all() and ep.observations[-1, 3] == 1 and ep.observations[:-1, 3].sum() == 0
        assert ep.rewards[-1] == 1 and ep.rewards[:-1].sum() == 0


def test_waiting_expert_names_the_cue_only_at_the_query():
    dataset = make_recall_dataset(30, n_cues=3, length=(3, 12), noise_dims=2, wait=True, seed=0)
    for ep in dataset.episodes:
        assert ep.actions[-1] == ep.observations[0, :3].argmax() and (ep.actions[:-1] == 3).all()
    env = NoisyRecallEnv(length=4, wait=True)
    cue = env.reset(seed=0)[0][:3].argmax()
    for action in (3, (cue + 1) % 3, 3):  # waiting, and answers before the query, change nothing
        assert env.step(action)[1:3] == (0.0, False)
    assert env.step(cue)[1:3] == (1.0, True)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="n_cues"):
        NoisyRecallEnv(n_cues=1)
    with pytest.raises(ValueError, match="is empty"):
        NoisyRecallVecEnv(2, length=(10, 5))
    with pytest.raises(ValueError, match="wait must be True or False, got 'False'"):
        NoisyRecallVecEnv(2, wait="False")


def test_evaluate_success_runs_one_episode_per_env():
    from sb3_elmur.common.evaluation import evaluate_success

    class AlwaysZero:
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.zeros(len(obs), dtype=np.int64), state

    assert evaluate_success(RecallOracle(3), NoisyRecallVecEnv(50, length=500, seed=0), max_steps=500) == 1.0
    chance = evaluate_success(AlwaysZero(), NoisyRecallVecEnv(300, length=5, seed=0), max_steps=5)
    assert 0.2 < chance < 0.47  # the share of episodes whose cue is 0
    assert evaluate_success(RecallOracle(3), NoisyRecallVecEnv(10, length=50, seed=0), max_steps=10) == 0.0  # unfinished


def test_bc_elmur_trained_on_short_episodes_recalls_at_2000_steps():
    """Length generalization on a small noisy task: trained on 10-40-step oracle episodes, right at 2,000 steps
    (50x the longest training episode; the long runs: benchmarks/recall_offline.py)."""
    import torch

    from sb3_elmur import RecurrentBC
    from sb3_elmur.common.evaluation import evaluate_success

    torch.set_num_threads(1)
    dataset = make_recall_dataset(500, length=(10, 40), seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(), dataset, sections=4, context_length=10, batch_size=32,
                        learning_rate=3e-3, seed=0, policy_kwargs=dict(d_model=32, n_layers=1, memory_size=2,
                                                                       context_length=10))
    model.learn(150)
    assert evaluate_success(model, NoisyRecallVecEnv(60, length=40, seed=1), 40) >= 0.9
    assert evaluate_success(model, NoisyRecallVecEnv(60, length=2000, seed=2), 2000) >= 0.9


def test_bc_elmur_with_final_action_loss_learns_the_waiting_form_and_recalls_at_2000_steps():
    """The waiting expert supervises the cue once per episode, at the query: without help, BC learns nothing (0.36 at the
    training length, benchmarks/results/recall_offline_wait.md). With the final-action loss, trained on 10-100-step
    episodes (up to 9 writes into 2 slots), right at 2,000 steps (the long runs: recall_offline_wait_final_action.md)."""
    import torch

    from sb3_elmur import RecurrentBC
    from sb3_elmur.common.evaluation import evaluate_success

    torch.set_num_threads(1)
    dataset = make_recall_dataset(500, length=(10, 100), wait=True, seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=True), dataset, sections=10, context_length=10, batch_size=32,
                        learning_rate=3e-3, final_action_coef=1.0, seed=0,
                        policy_kwargs=dict(d_model=32, n_layers=1, memory_size=2, context_length=10))
    model.learn(300)
    assert evaluate_success(model, NoisyRecallVecEnv(60, length=100, wait=True, seed=1), 100) >= 0.9
    assert evaluate_success(model, NoisyRecallVecEnv(60, length=2000, wait=True, seed=2), 2000) >= 0.9
