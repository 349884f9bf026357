"""Long learning runs. Online: the passive T-Maze with a 10-step corridor, where the decision at the junction (step
10) is the first step of the second segment, so it can only be right if the cue (step 0) came through ELMUR's memory.
Offline: noisy recall far past the training length."""

import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.evaluation import evaluate_tmaze
from sb3_elmur.presets import TMAZE_POLICY_KWARGS, TMAZE_PPO_KWARGS

# Learning runs of 40k-200k env steps (minutes on 2 cores): `pytest -m slow`. The default suite keeps short
# training smoke tests (test_policies.py, test_zoo.py, test_readme.py).
pytestmark = pytest.mark.slow

torch.set_num_threads(1)
CORRIDOR = 10


def _train_until(model, target: float, max_steps: int, chunk: int = 8192) -> float:
    success = 0.0
    while model.num_timesteps < max_steps and success < target:
        model.learn(chunk, reset_num_timesteps=False)
        success = evaluate_tmaze(model, CORRIDOR, n_episodes=100)
    return success


def _env(seed: int = 0) -> VecMonitor:
    return VecMonitor(TMazeVecEnv(8, corridor_length=CORRIDOR, variant="passive", seed=seed))


def test_elmur_policy_solves_passive_tmaze():
    model = RecurrentPPO("ElmurPolicy", _env(), policy_kwargs=TMAZE_POLICY_KWARGS, seed=0, **TMAZE_PPO_KWARGS)
    success = _train_until(model, target=0.95, max_steps=200_000)
    assert success >= 0.95, f"ElmurPolicy reached only {success:.2f} after {model.num_timesteps} steps"


def test_elmur_ppo_solves_passive_tmaze():
    """ElmurPPO (its defaults: sequences of 32 steps, memory horizon 16) with the same PPO settings."""
    model = ElmurPPO("ElmurPolicy", _env(), policy_kwargs=TMAZE_POLICY_KWARGS, seed=0, **TMAZE_PPO_KWARGS)
    success = _train_until(model, target=0.95, max_steps=200_000)
    assert success >= 0.95, f"ElmurPPO reached only {success:.2f} after {model.num_timesteps} steps"


def test_memoryless_ppo_stays_at_chance():
    model = PPO("MlpPolicy", _env(), seed=0, **TMAZE_PPO_KWARGS)
    model.learn(40_960)
    success = evaluate_tmaze(model, CORRIDOR, n_episodes=100)
    # Without memory it cannot know the cue at the junction: at most one of the two halves is right. (After 40k
    # steps it does not yet reach the junction in every episode: seed 0 scores 0.29, so no lower bound.)
    assert success <= 0.6, f"a memoryless policy beat chance ({success:.2f}): the observation leaks the cue"


def test_elmur_ppo_learns_memory_across_rollouts():
    """Passive T-Maze corridor 24 with rollouts of 16 steps: the cue and the junction are never in one rollout,
    so the decision is right only if the memory horizon carries credit back to the cue's write in an earlier
    rollout. Raw advantages and a small entropy bonus let the policy walk the corridor and still try turns at
    the junction (with normalized advantages it never turned: benchmarks/results/elmur_ppo_learning)."""
    env = VecMonitor(TMazeVecEnv(8, corridor_length=24, variant="passive", seed=0, terminate_on_timeout=True))
    ppo_kwargs = {**TMAZE_PPO_KWARGS, "n_steps": 16, "ent_coef": 0.001, "normalize_advantage": False}
    model = ElmurPPO("ElmurPolicy", env, policy_kwargs=TMAZE_POLICY_KWARGS, seed=0, sequence_length=16,
                     memory_horizon=32, **ppo_kwargs)
    success = 0.0
    while model.num_timesteps < 300_000 and success < 0.95:
        model.learn(8192, reset_num_timesteps=False)
        success = evaluate_tmaze(model, 24, n_episodes=100)
    assert success >= 0.95, f"ElmurPPO reached only {success:.2f} after {model.num_timesteps} steps"


def test_bc_final_action_loss_teaches_the_waiting_form_to_hold_past_the_training_length():
    """Offline, noisy recall with a waiting expert (the cue supervised at the query only): the benchmark's config
    (benchmarks/recall_offline.py, ElmurPolicy-final-action, seed 0): trained on 30-100-step episodes, right at
    10,000 steps (100x the longest)."""
    from sb3_elmur import RecurrentBC
    from sb3_elmur.envs import NoisyRecallEnv, NoisyRecallVecEnv, make_recall_dataset
    from sb3_elmur.evaluation import evaluate_success

    dataset = make_recall_dataset(2000, length=(30, 100), wait=True, seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=True), dataset, learning_rate=1e-3, batch_size=64,
                        sections=10, context_length=10, final_action_coef=1.0, seed=0,
                        policy_kwargs=dict(d_model=64, n_layers=2, n_heads=2, memory_size=2, context_length=10))
    model.learn(1000)
    success = evaluate_success(model, NoisyRecallVecEnv(100, length=10_000, wait=True, seed=1000), 10_000)
    assert success >= 0.95, f"success {success:.2f} at 10,000 steps"
