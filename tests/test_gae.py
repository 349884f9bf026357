"""ElmurPPO's advantages and returns: GAE(lambda) with SB3's truncation bootstrap, checked against SB3's own
``RolloutBuffer.compute_returns_and_advantage`` and against a recomputation by hand over whole episodes.

SB3's ``OnPolicyAlgorithm.collect_rollouts`` handles a TimeLimit truncation by adding ``gamma * V(terminal_obs)``
to the step's reward (the value of the terminal observation, from the state the episode reached) and then
treating the step as the episode's last; a termination adds nothing. ElmurPPO must compute the same numbers."""

import copy
from typing import Dict, List, Tuple

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.ppo.buffers import ElmurRolloutBuffer
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.policies import ElmurPolicy
from tests.dummy_envs import RandomLengthEnv

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4, alpha=0.5, memory_init_std=0.5)
GAMMA, LAMBDA = 0.9, 0.7  # far from the defaults, and from each other: a swapped or dropped factor shows
OBS_SPACE = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)


def _sb3_advantages(
    rewards: np.ndarray, values: np.ndarray, episode_starts: np.ndarray, last_values: np.ndarray, dones: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """SB3's ``RolloutBuffer.compute_returns_and_advantage`` on these [n_steps, n_envs] arrays: (advantages, returns)."""
    n_steps, n_envs = rewards.shape
    buffer = RolloutBuffer(n_steps, OBS_SPACE, spaces.Discrete(3), device="cpu", gae_lambda=LAMBDA, gamma=GAMMA,
                           n_envs=n_envs)
    for t in range(n_steps):
        buffer.add(np.zeros((n_envs, 3), dtype=np.float32), np.zeros((n_envs, 1)), rewards[t], episode_starts[t],
                   torch.as_tensor(values[t]), torch.zeros(n_envs))
    buffer.compute_returns_and_advantage(torch.as_tensor(last_values), dones)
    return buffer.advantages, buffer.returns


def test_buffer_gae_equals_sb3_rollout_buffer():
    """The recursion alone, on random rewards and values with episode starts anywhere (first step included) and
    rollouts that end both inside an episode and on its last step."""
    rng = np.random.default_rng(0)
    n_steps, n_envs = 23, 5
    config = ElmurConfig(**SMALL)
    buffer = ElmurRolloutBuffer(n_steps, OBS_SPACE, spaces.Discrete(3), config, gamma=GAMMA, gae_lambda=LAMBDA,
                                n_envs=n_envs, sequence_length=8, memory_horizon=5)
    rewards = rng.normal(size=(n_steps, n_envs)).astype(np.float32)
    values = rng.normal(size=(n_steps, n_envs)).astype(np.float32)
    starts = rng.random((n_steps, n_envs)) < 0.2
    starts[0, :2] = True
    last_values = rng.normal(size=n_envs).astype(np.float32)
    dones = np.array([True, False, True, False, False])
    h = buffer.history_length
    buffer.rewards[:] = torch.as_tensor(rewards)
    buffer.value_estimates[:] = torch.as_tensor(values)
    buffer.episode_starts[h:] = torch.as_tensor(starts)
    buffer.pos, buffer.full = n_steps, True
    buffer.compute_returns_and_advantage(torch.as_tensor(last_values), torch.as_tensor(dones))
    advantages, returns = _sb3_advantages(rewards, values, starts, last_values, dones)
    np.testing.assert_allclose(buffer.advantages.numpy(), advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(buffer.returns, returns, rtol=1e-5, atol=1e-5)


class _Recorder(VecEnvWrapper):
    """Keeps every observation, reward, done and info the algorithm sees (copies), from the first reset on."""

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self.first_obs: np.ndarray = np.zeros(0)
        self.steps: List[Tuple[np.ndarray, np.ndarray, np.ndarray, List[Dict]]] = []

    def reset(self) -> np.ndarray:
        obs = self.venv.reset()
        self.first_obs, self.steps = obs.copy(), []
        return obs

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.steps.append((obs.copy(), rewards.copy(), dones.copy(), copy.deepcopy(infos)))
        return obs, rewards, dones, infos


def _episode_values(policy: ElmurPolicy, observations: np.ndarray) -> np.ndarray:
    """Values at every step of one episode [T, ...], from its first step, in one segment-parallel pass of the
    backbone (not the acting path that ElmurPPO's rollouts take)."""
    t = len(observations)
    starts = torch.zeros(1, t, dtype=torch.bool)
    starts[0, 0] = True
    with torch.no_grad():
        out, _ = policy.backbone_sequences(torch.as_tensor(observations), policy.lstm_actor.model.initial_state(1),
                                           starts)
        _, latent_vf = policy._heads(out.reshape(t, -1))
        return policy.value_net(latent_vf).flatten().double().numpy()


def _by_hand(policy: ElmurPolicy, recorder: _Recorder) -> Dict[str, np.ndarray]:
    """From the recorded stream of every env, episode by episode: values ``V`` [T + 1, n_envs] (of the observation
    at every step, and of the one after the last step), ``V_terminal`` [T, n_envs] (of the terminal observation
    where an episode ends, continuing that episode), rewards, dones, truncations and episode starts [T, n_envs]."""
    n_envs, steps = recorder.num_envs, recorder.steps
    total = len(steps)
    obs = np.stack([recorder.first_obs] + [o for o, _, _, _ in steps])  # [T + 1, n_envs, ...]
    rewards = np.stack([r for _, r, _, _ in steps]).astype(np.float64)
    dones = np.stack([d for _, _, d, _ in steps])
    truncated = np.array([[d[i] and info[i].get("TimeLimit.truncated", False) for i in range(n_envs)]
                          for _, _, d, info in steps])
    starts = np.concatenate([np.ones((1, n_envs), dtype=bool), dones[:-1]])
    values, terminal_values = np.zeros((total + 1, n_envs)), np.zeros((total, n_envs))
    for i in range(n_envs):
        begin = 0
        for t in range(total + 1):
            if t < total and not dones[t, i]:
                continue
            if t == total:  # the stream's last episode, unfinished: its observations to the one after the last step
                values[begin:, i] = _episode_values(policy, obs[begin:, i])
                break
            terminal = steps[t][3][i]["terminal_observation"]
            episode = _episode_values(policy, np.concatenate([obs[begin : t + 1, i], terminal[None]]))
            values[begin : t + 1, i], terminal_values[t, i] = episode[:-1], episode[-1]
            begin = t + 1
    return dict(V=values, V_terminal=terminal_values, rewards=rewards, dones=dones, truncated=truncated, starts=starts)


def _advantages_by_hand(ref: Dict[str, np.ndarray], first: int, end: int) -> np.ndarray:
    """GAE of rollout steps ``first``..``end - 1`` as the sum over the rest of each step's episode inside the
    rollout, ``A_t = sum_u (gamma * lambda)^(u - t) delta_u``, with ``delta_u = r_u + gamma * next_u - V_u`` and
    ``next_u`` the value of what follows: 0 after a termination, ``V(terminal_obs)`` after a truncation, the next
    observation's value otherwise (at the rollout's end too)."""
    V, n_envs = ref["V"], ref["V"].shape[1]
    next_values = np.where(ref["truncated"], ref["V_terminal"], np.where(ref["dones"], 0.0, V[1:]))
    delta = ref["rewards"] + GAMMA * next_values - V[:-1]
    advantages = np.zeros((end - first, n_envs))
    for i in range(n_envs):
        for t in range(first, end):
            u = t
            while True:
                advantages[t - first, i] += (GAMMA * LAMBDA) ** (u - t) * delta[u, i]
                if ref["dones"][u, i] or u + 1 == end:
                    break
                u += 1
    return advantages


@pytest.fixture(scope="module")
def two_rollouts():
    """Two rollouts of 3 envs (no update between them, so that whole episodes can be recomputed with one set of
    parameters), whose episodes end by termination, by the env's own truncation and by a TimeLimit; the second
    rollout continues the first one's episodes."""
    env = make_vec_env(RandomLengthEnv, n_envs=3, seed=3, wrapper_class=gym.wrappers.TimeLimit,
                       wrapper_kwargs=dict(max_episode_steps=6),
                       env_kwargs=dict(action_space=spaces.Discrete(3), min_len=2, max_len=9))
    recorder = _Recorder(env)
    model = ElmurPPO("ElmurPolicy", recorder, n_steps=16, batch_size=16, gamma=GAMMA, gae_lambda=LAMBDA,
                     policy_kwargs=SMALL, seed=0)
    _, callback = model._setup_learn(10_000, None)
    callback.on_training_start(locals(), globals())
    results = []
    for _ in range(2):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        buffer = model.rollout_buffer
        results.append({name: getattr(buffer, name).clone().double().numpy()
                        for name in ("rewards", "value_estimates", "advantages", "lambda_returns")})
    model.policy.set_training_mode(False)
    return model, _by_hand(model.policy, recorder), results


def test_the_rollouts_hold_every_kind_of_episode_end(two_rollouts):
    _, ref, _ = two_rollouts
    ends = ref["dones"]
    # TimeLimit at 6 steps, the env's own truncation at 2-9 steps, terminations: all three happen.
    assert (ends & ~ref["truncated"]).sum() >= 2 and ref["truncated"].sum() >= 3
    # An episode that began in the first rollout is truncated in the second (its bootstrap needs the state carried).
    began = np.maximum.accumulate(np.where(ref["starts"], np.arange(32)[:, None], 0), axis=0)
    assert (ref["truncated"][16:] & (began[16:] < 16)).any()


@pytest.mark.parametrize("rollout", [0, 1])
def test_advantages_and_returns_equal_sb3_and_whole_episodes_by_hand(two_rollouts, rollout):
    """Rollout 0 starts from reset, rollout 1 from the first's last states. Values, the truncation bootstrap in the
    rewards, then GAE(lambda) against SB3's RolloutBuffer (given SB3's bootstrapped rewards) and against the
    forward sums of :func:`_advantages_by_hand`."""
    model, ref, results = two_rollouts
    got = results[rollout]
    first, end = 16 * rollout, 16 * (rollout + 1)
    values = ref["V"][first:end]
    np.testing.assert_allclose(got["value_estimates"], values, rtol=0, atol=1e-5)
    # SB3's collect_rollouts: reward += gamma * V(terminal_obs) where a TimeLimit truncated the episode.
    rewards = ref["rewards"][first:end] + GAMMA * np.where(ref["truncated"][first:end], ref["V_terminal"][first:end], 0.0)
    np.testing.assert_allclose(got["rewards"], rewards, rtol=0, atol=1e-5)
    advantages, returns = _sb3_advantages(rewards, values, ref["starts"][first:end], ref["V"][end],
                                          ref["dones"][end - 1])
    np.testing.assert_allclose(got["advantages"], advantages, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["lambda_returns"], returns, rtol=0, atol=1e-4)
    by_hand = _advantages_by_hand(ref, first, end)
    np.testing.assert_allclose(got["advantages"], by_hand, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["lambda_returns"], by_hand + values, rtol=0, atol=1e-4)
