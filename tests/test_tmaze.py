import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecMonitor

from sb3_elmur.envs import TMazeEnv, TMazeOracle, TMazeVecEnv, register_envs

RIGHT, UP, LEFT, DOWN = 0, 1, 2, 3


class ConstantModel:
    """Model-like object for evaluate_policy that always plays the same action."""

    def __init__(self, action: int):
        self.action = action

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return np.full(len(observation), self.action, dtype=np.int64), state


def run_episode(env: TMazeEnv, actions, cue: int):
    """Play ``actions`` from a reset with a fixed cue, stop at the end of the episode."""
    obs, _ = env.reset(options={"cue": cue})
    transitions = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        transitions.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return transitions


def run_vec_oracle(venv: TMazeVecEnv, max_steps: int):
    """Run the oracle until every env has finished one episode, return first-episode returns and successes."""
    oracle = TMazeOracle(venv.num_envs)
    obs = venv.reset()
    episode_start = np.ones(venv.num_envs, dtype=bool)
    returns = np.zeros(venv.num_envs)
    first_return = np.full(venv.num_envs, np.nan)
    first_success = np.zeros(venv.num_envs, dtype=bool)
    finished = np.zeros(venv.num_envs, dtype=bool)
    for _ in range(max_steps):
        obs, rewards, dones, infos = venv.step(oracle.act(obs, episode_start))
        returns += rewards
        for i in np.flatnonzero(dones & ~finished):
            first_return[i] = returns[i]
            first_success[i] = infos[i]["is_success"]
        finished |= dones
        returns[dones] = 0.0
        episode_start = dones
        if finished.all():
            break
    assert finished.all()
    return first_return, first_success


@pytest.mark.parametrize("variant", ["reference", "passive"])
@pytest.mark.parametrize("noise", [True, False])
def test_check_env(variant, noise):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(TMazeEnv(corridor_length=5, variant=variant, noise=noise))
        gym_check_env(TMazeEnv(corridor_length=5, variant=variant, noise=noise), skip_render_check=True)


def test_spaces_and_first_observation():
    env = TMazeEnv(corridor_length=4)
    assert env.observation_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    assert env.action_space == gym.spaces.Discrete(4)
    for cue in (1, -1):
        obs, info = env.reset(options={"cue": cue})
        assert obs.dtype == np.float32
        assert obs[0] == 0.0 and obs[1] == cue and obs[2] == 0.0
        assert info == {}
        # The cue disappears after the first observation
        obs, *_ = env.step(RIGHT)
        assert obs[1] == 0.0


def test_random_cue_and_noise():
    env = TMazeEnv(corridor_length=3)
    cues = {env.reset(seed=i)[0][1] for i in range(40)}
    assert cues == {-1.0, 1.0}
    env.reset(seed=0)
    noise = {env.step(LEFT)[0][3] for _ in range(4)}
    for _ in range(20):
        env.reset()
        noise |= {env.step(LEFT)[0][3] for _ in range(4)}
    assert noise == {-1.0, 0.0, 1.0}

    env = TMazeEnv(corridor_length=3, noise=False)
    assert env.reset(seed=0)[0][3] == 0.0
    assert all(env.step(LEFT)[0][3] == 0.0 for _ in range(4))

    # Same seed, same episode
    env_a, env_b = TMazeEnv(corridor_length=3), TMazeEnv(corridor_length=3)
    obs_a = [env_a.reset(seed=7)[0]] + [env_a.step(RIGHT)[0] for _ in range(3)]
    obs_b = [env_b.reset(seed=7)[0]] + [env_b.step(RIGHT)[0] for _ in range(3)]
    np.testing.assert_array_equal(obs_a, obs_b)


@pytest.mark.parametrize("cue", [1, -1])
def test_correct_goal(cue):
    env = TMazeEnv(corridor_length=3, noise=False)
    goal_action = UP if cue == 1 else DOWN
    transitions = run_episode(env, [RIGHT, RIGHT, RIGHT, goal_action], cue=cue)
    assert len(transitions) == 4
    for obs, reward, terminated, truncated, info in transitions[:3]:
        assert reward == 0.0 and not terminated and not truncated and info == {}
    # At-junction flag only once x == L
    assert [t[0][2] for t in transitions[:3]] == [0.0, 0.0, 1.0]
    obs, reward, terminated, truncated, info = transitions[-1]
    assert reward == 1.0 and terminated and not truncated
    assert info["is_success"] is True
    np.testing.assert_array_equal(obs, [cue, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("variant", ["reference", "passive"])
def test_wrong_goal(variant):
    env = TMazeEnv(corridor_length=3, variant=variant, noise=False)
    obs, reward, terminated, truncated, info = run_episode(env, [RIGHT, RIGHT, RIGHT, DOWN], cue=1)[-1]
    # No penalty at the junction in the passive variant either
    assert reward == 0.0 and terminated and not truncated
    assert info["is_success"] is False
    assert obs[0] == -1.0


def test_timeout():
    """With terminate_on_timeout=False a time-out is a truncation (SB3's algorithms bootstrap past it)."""
    env = TMazeEnv(corridor_length=3, noise=False, terminate_on_timeout=False)
    assert env.time_limit == 5
    transitions = run_episode(env, [RIGHT] * 10, cue=1)
    assert len(transitions) == 5
    assert not any(t[3] for t in transitions[:-1])
    _, reward, terminated, truncated, info = transitions[-1]
    assert reward == 0.0 and truncated and not terminated
    assert info == {"is_success": False}

    # Reaching the goal on the very last allowed step is a termination, not a timeout
    transitions = run_episode(env, [LEFT, RIGHT, RIGHT, RIGHT, UP], cue=1)
    _, reward, terminated, truncated, info = transitions[-1]
    assert len(transitions) == 5 and reward == 1.0 and terminated and not truncated and info["is_success"]


def test_terminate_on_timeout():
    """By default a time-out is a terminal failure, so algorithms do not bootstrap past it."""
    env = TMazeEnv(corridor_length=3, noise=False)
    transitions = run_episode(env, [RIGHT] * 10, cue=1)
    _, reward, terminated, truncated, info = transitions[-1]
    assert len(transitions) == 5 and reward == 0.0 and terminated and not truncated and info == {"is_success": False}
    venv = TMazeVecEnv(2, corridor_length=3, seed=0)
    venv.reset()
    for _ in range(5):
        _, _, dones, infos = venv.step(np.full(2, LEFT))
    assert dones.all() and all(info["TimeLimit.truncated"] is False and info["is_success"] is False for info in infos)
    venv = TMazeVecEnv(2, corridor_length=3, seed=0, terminate_on_timeout=False)
    venv.reset()
    for _ in range(5):
        _, _, dones, infos = venv.step(np.full(2, LEFT))
    assert dones.all() and all(info["TimeLimit.truncated"] is True for info in infos)


def test_walls():
    env = TMazeEnv(corridor_length=2, noise=False)
    env.reset(options={"cue": 1})
    # Up/down/left at x = 0 hit walls
    for action in (UP, DOWN, LEFT):
        obs, reward, terminated, truncated, _ = env.step(action)
        assert env.position == 0 and not terminated and not truncated and reward == 0.0
        np.testing.assert_array_equal(obs, [0.0, 0.0, 0.0, 0.0])

    env.reset(options={"cue": 1})
    env.step(RIGHT)
    # Up/down in the corridor (not at the junction) hit walls
    env.step(UP)
    env.step(DOWN)
    assert env.position == 1
    env.step(LEFT)
    assert env.position == 0

    env.reset(options={"cue": 1})
    env.step(RIGHT)
    env.step(RIGHT)
    obs, *_ = env.step(RIGHT)
    # Right at the junction hits a wall
    assert env.position == 2 and obs[2] == 1.0
    obs, *_ = env.step(LEFT)
    assert env.position == 1 and obs[2] == 0.0


def test_passive_penalty():
    corridor_length = 4
    env = TMazeEnv(corridor_length=corridor_length, variant="passive", noise=False)
    ref = TMazeEnv(corridor_length=corridor_length, variant="reference", noise=False)
    actions = [UP, RIGHT, RIGHT, RIGHT, RIGHT, UP]
    rewards = [t[1] for t in run_episode(env, actions, cue=1)]
    assert rewards == pytest.approx([-0.25, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert sum(t[1] for t in run_episode(ref, actions, cue=1)) == 1.0

    # Right at the junction is free, left/up/down in the corridor are not
    rewards = [t[1] for t in run_episode(env, [RIGHT, LEFT, DOWN, RIGHT, RIGHT, RIGHT], cue=1)]
    assert rewards == pytest.approx([0.0, -0.25, -0.25, 0.0, 0.0, 0.0])

    transitions = run_episode(env, [DOWN] * 10, cue=-1)
    assert len(transitions) == env.time_limit and transitions[-1][2]  # the time-out ends it as a failure
    assert sum(t[1] for t in transitions) == pytest.approx(-env.time_limit / corridor_length)
    assert sum(t[1] for t in run_episode(ref, [DOWN] * 10, cue=-1)) == 0.0


@pytest.mark.parametrize("bad_length", [0, -3, 2.5, 10.0, "10", True, None])
def test_bad_corridor_length(bad_length):
    with pytest.raises(ValueError, match="corridor_length"):
        TMazeEnv(corridor_length=bad_length)
    with pytest.raises(ValueError, match="corridor_length"):
        TMazeVecEnv(2, corridor_length=bad_length)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        TMazeEnv(variant="active")
    with pytest.raises(ValueError, match="variant"):
        TMazeVecEnv(2, variant="Passive")
    with pytest.raises(ValueError, match="render_mode"):
        TMazeEnv(render_mode="human")
    with pytest.raises(ValueError, match="cue"):
        TMazeEnv().reset(options={"cue": 0})
    for bad_num_envs in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_envs"):
            TMazeVecEnv(bad_num_envs)
    for bad_cues in ([1, -1, 1], [1, 0], [[1, -1]]):
        with pytest.raises(ValueError, match="cues"):
            TMazeVecEnv(2, cues=bad_cues)
    with pytest.raises(ValueError):
        TMazeEnv().step(4)
    for flag in ("terminate_on_timeout", "noise"):  # a string from a config would silently count as True
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'False'"):
            TMazeEnv(**{flag: "False"})
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'False'"):
            TMazeVecEnv(2, **{flag: "False"})
    venv = TMazeVecEnv(2)
    for bad_actions in ([0, 4], [-1, 0]):
        with pytest.raises(ValueError):
            venv.step(np.array(bad_actions))


def test_corridor_length_one():
    # Smallest maze: the first step can already reach the junction
    env = TMazeEnv(corridor_length=1, noise=False)
    transitions = run_episode(env, [RIGHT, UP], cue=1)
    assert [t[1] for t in transitions] == [0.0, 1.0] and transitions[-1][2]


def test_render():
    env = TMazeEnv(corridor_length=3, render_mode="ansi")
    env.reset(options={"cue": -1})
    env.step(RIGHT)
    text = env.render()
    assert isinstance(text, str)
    assert ".A.J" in text and "cue -1" in text
    with pytest.warns(UserWarning, match="render_mode"):
        assert TMazeEnv(corridor_length=3).render() is None


def test_registration():
    register_envs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Idempotent
        register_envs()
        for env_id, variant in [("sb3_elmur/TMaze-v0", "reference"), ("sb3_elmur/PassiveTMaze-v0", "passive")]:
            env = gym.make(env_id, corridor_length=100)
            assert env.spec.max_episode_steps is None
            assert env.unwrapped.variant == variant
            assert env.unwrapped.corridor_length == 100
            obs, _ = env.reset(seed=0, options={"cue": -1})
            # Our own time limit (L + 2 = 102, a failure) and no gymnasium TimeLimit wrapper
            for step in range(1, 200):
                obs, reward, terminated, truncated, info = env.step(LEFT)
                if terminated or truncated:
                    break
            assert step == 102 and terminated and not truncated and info["is_success"] is False
            env.close()
    assert gym.make("sb3_elmur/TMaze-v0").unwrapped.corridor_length == 10


def test_oracle_single_env():
    for variant in ("reference", "passive"):
        env = TMazeEnv(corridor_length=7, variant=variant)
        oracle = TMazeOracle(1)
        for seed in range(6):
            obs, _ = env.reset(seed=seed)
            episode_start = True
            total, length, done = 0.0, 0, False
            while not done:
                action = oracle.act(obs, np.array([episode_start]))[0]
                obs, reward, terminated, truncated, info = env.step(action)
                episode_start = False
                total += reward
                length += 1
                done = terminated or truncated
            assert terminated and info["is_success"] and total == 1.0 and length == 8


def test_oracle_needs_episode_start():
    # Without the episode start flag the oracle never stores the cue (it then turns down)
    venv = TMazeVecEnv(4, corridor_length=3, cues=[1, 1, -1, -1])
    oracle = TMazeOracle(4)
    obs = venv.reset()
    for _ in range(4):
        obs, rewards, dones, infos = venv.step(oracle.act(obs, np.zeros(4, dtype=bool)))
    assert dones.all()
    assert [info["is_success"] for info in infos] == [False, False, True, True]


def test_vec_env_matches_single_env():
    num_envs, n_steps = 6, 400
    rng = np.random.default_rng(0)
    for corridor_length, variant, terminal_timeout in [(1, "reference", True), (3, "reference", False),
                                                       (1, "passive", False), (3, "passive", True)]:
        cues = np.array([1, -1, 1, -1, 1, -1])
        kwargs = dict(corridor_length=corridor_length, variant=variant, noise=False, terminate_on_timeout=terminal_timeout)
        venv = TMazeVecEnv(num_envs, cues=cues, **kwargs)
        envs = [TMazeEnv(**kwargs) for _ in range(num_envs)]
        vec_obs = venv.reset()
        single_obs = np.stack([env.reset(options={"cue": int(cue)})[0] for env, cue in zip(envs, cues)])
        np.testing.assert_array_equal(vec_obs, single_obs)
        # Bias towards right so that goals are reached regularly
        all_actions = rng.choice(4, size=(n_steps, num_envs), p=[0.55, 0.15, 0.15, 0.15])
        outcomes = set()
        for actions in all_actions:
            vec_obs, vec_rewards, vec_dones, vec_infos = venv.step(actions)
            assert vec_rewards.dtype == np.float32 and vec_dones.dtype == bool
            for i, env in enumerate(envs):
                obs, reward, terminated, truncated, info = env.step(actions[i])
                assert vec_rewards[i] == pytest.approx(reward)
                assert vec_dones[i] == (terminated or truncated)
                if terminated or truncated:
                    np.testing.assert_array_equal(vec_infos[i]["terminal_observation"], obs)
                    assert vec_infos[i]["is_success"] == info["is_success"]
                    assert vec_infos[i]["TimeLimit.truncated"] == truncated
                    outcomes.add("timeout" if truncated else ("success" if info["is_success"] else "failure"))
                    obs, _ = env.reset(options={"cue": int(cues[i])})
                else:
                    assert vec_infos[i] == {}
                np.testing.assert_array_equal(vec_obs[i], obs)
        # Time-outs are failures (terminations) unless the envs truncate them
        assert outcomes == ({"success", "failure"} if terminal_timeout else {"timeout", "success", "failure"})


def test_vec_env_auto_reset():
    venv = TMazeVecEnv(2, corridor_length=2, noise=False, cues=[1, -1])
    obs = venv.reset()
    np.testing.assert_array_equal(obs[:, 1], [1, -1])
    venv.step(np.array([RIGHT, RIGHT]))
    venv.step(np.array([RIGHT, RIGHT]))
    obs, rewards, dones, infos = venv.step(np.array([UP, RIGHT]))
    np.testing.assert_array_equal(rewards, [1.0, 0.0])
    np.testing.assert_array_equal(dones, [True, False])
    assert infos[0]["is_success"] is True and infos[0]["TimeLimit.truncated"] is False
    np.testing.assert_array_equal(infos[0]["terminal_observation"], [1.0, 0.0, 1.0, 0.0])
    # Env 0 was reset: new episode with its cue visible again
    np.testing.assert_array_equal(obs[0], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(obs[1], [0.0, 0.0, 1.0, 0.0])
    assert infos[1] == {}
    assert venv.get_attr("position") == [0, 2]
    assert venv.get_attr("elapsed_steps") == [0, 3]
    # Env 1 times out on its 4th step (L + 2): a failure, not a truncation
    obs, rewards, dones, infos = venv.step(np.array([RIGHT, RIGHT]))
    np.testing.assert_array_equal(dones, [False, True])
    assert infos[1]["TimeLimit.truncated"] is False and infos[1]["is_success"] is False
    np.testing.assert_array_equal(obs[1], [0.0, -1.0, 0.0, 0.0])


@pytest.mark.parametrize("variant", ["reference", "passive"])
def test_vec_oracle_corridor_50(variant):
    venv = TMazeVecEnv(100, corridor_length=50, variant=variant, seed=0)
    returns, successes = run_vec_oracle(venv, max_steps=60)
    assert successes.all()
    np.testing.assert_allclose(returns, 1.0)
    # Random cues: both must show up
    assert set(venv.get_attr("cue")) == {-1, 1}


def test_vec_oracle_corridor_10000():
    venv = TMazeVecEnv(100, corridor_length=10_000, seed=1)
    start = time.perf_counter()
    returns, successes = run_vec_oracle(venv, max_steps=10_002)
    assert time.perf_counter() - start < 10.0
    assert successes.all()
    np.testing.assert_allclose(returns, 1.0)


def test_fixed_cues():
    cues = np.array([1, -1] * 5)
    venv = TMazeVecEnv(10, corridor_length=2, cues=cues, seed=0)
    np.testing.assert_array_equal(venv.cues, cues)
    obs = venv.reset()
    np.testing.assert_array_equal(obs[:, 1], cues)
    assert venv.get_attr("cue") == cues.tolist()
    # Every later episode keeps the same cue
    for _ in range(3):
        for _ in range(3):
            obs, _, dones, _ = venv.step(np.full(10, RIGHT))
        obs, _, dones, _ = venv.step(np.full(10, RIGHT))
        assert dones.all()
        np.testing.assert_array_equal(obs[:, 1], cues)

    # Random cues otherwise
    venv = TMazeVecEnv(10, corridor_length=2, seed=0)
    seen = np.stack([venv.reset()[:, 1] for _ in range(10)])
    assert set(np.unique(seen)) == {-1.0, 1.0}

    # A one-off cue through set_options, like reset(options=...) of a gym env
    venv = TMazeVecEnv(3, corridor_length=2, cues=[1, 1, 1])
    venv.set_options([{}, {"cue": -1}, {}])
    np.testing.assert_array_equal(venv.reset()[:, 1], [1, -1, 1])
    np.testing.assert_array_equal(venv.reset()[:, 1], [1, 1, 1])


def test_vec_env_noise():
    venv = TMazeVecEnv(50, corridor_length=2, seed=0)
    observations = [venv.reset()]
    terminal_noise = []
    for _ in range(40):
        obs, _, dones, infos = venv.step(np.full(50, RIGHT))
        observations.append(obs)
        terminal_noise += [infos[i]["terminal_observation"][3] for i in np.flatnonzero(dones)]
    noise = np.stack(observations)[:, :, 3]
    # Uniform over {-1, 0, 1}, both after steps and after (auto-)resets
    values, counts = np.unique(noise, return_counts=True)
    np.testing.assert_array_equal(values, [-1.0, 0.0, 1.0])
    assert counts.min() > 0.28 * noise.size
    assert set(noise[0]) == {-1.0, 0.0, 1.0} and set(terminal_noise) == {-1.0, 0.0, 1.0}
    # Auto-reset observations (every 4 steps, right-only) get noise too
    assert set(noise[4]) == {-1.0, 0.0, 1.0}

    venv = TMazeVecEnv(50, corridor_length=2, noise=False, seed=0)
    assert not venv.reset()[:, 3].any()
    assert not any(venv.step(np.full(50, RIGHT))[0][:, 3].any() for _ in range(10))


def test_vec_env_seeding():
    def rollout(venv):
        observations = [venv.reset()]
        for _ in range(30):
            observations.append(venv.step(np.full(venv.num_envs, RIGHT))[0])
        return np.stack(observations)

    first, second = rollout(TMazeVecEnv(5, corridor_length=3, seed=3)), rollout(TMazeVecEnv(5, corridor_length=3, seed=3))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, rollout(TMazeVecEnv(5, corridor_length=3, seed=4)))

    venv = TMazeVecEnv(5, corridor_length=3)
    assert venv.seed(3) == [3, 4, 5, 6, 7]
    np.testing.assert_array_equal(rollout(venv), first)


def test_vec_env_api():
    venv = TMazeVecEnv(4, corridor_length=5, variant="passive", cues=[1, -1, 1, -1])
    assert venv.observation_space == TMazeEnv().observation_space
    assert venv.action_space == TMazeEnv().action_space
    assert venv.render_mode is None
    assert venv.get_attr("corridor_length") == [5] * 4
    assert venv.get_attr("variant", indices=[1, 2]) == ["passive"] * 2
    assert venv.get_attr("cue", indices=1) == [-1]
    assert venv.has_attr("time_limit") and not venv.has_attr("not_an_attribute")
    venv.set_attr("custom", 3)
    assert venv.get_attr("custom", indices=[0, 3]) == [3, 3]
    with pytest.raises(ValueError):
        venv.set_attr("custom", 4, indices=[0])
    with pytest.raises(AttributeError):
        venv.set_attr("corridor_length", 7)
    with pytest.raises(AttributeError):
        venv.set_attr("cue", 1)
    venv.step(np.zeros(4, dtype=np.int64))
    assert venv.get_attr("position") == [1] * 4
    assert venv.env_method("get_attr", "position", indices=[0, 2]) == [[1] * 4, [1] * 4]
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 4
    assert venv.env_is_wrapped(gym.Wrapper, indices=[2]) == [False]
    venv.close()


def test_vec_monitor_and_evaluate_policy():
    corridor_length = 20
    cues = np.array([1, -1] * 5)
    venv = VecMonitor(TMazeVecEnv(10, corridor_length=corridor_length, cues=cues, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rewards, lengths = evaluate_policy(TMazeOracle(10), venv, n_eval_episodes=20, return_episode_rewards=True)
    assert rewards == [1.0] * 20 and lengths == [corridor_length + 1] * 20

    # Always right: timeout after L + 2 steps
    rewards, lengths = evaluate_policy(ConstantModel(RIGHT), venv, n_eval_episodes=10, return_episode_rewards=True)
    assert rewards == [0.0] * 10 and lengths == [corridor_length + 2] * 10

    # Go right then always up: right for cue +1 only, i.e. half the balanced cues
    class RightThenUp:
        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            return np.where(observation[:, 2] > 0.5, UP, RIGHT), state

    mean_reward, _ = evaluate_policy(RightThenUp(), venv, n_eval_episodes=20)
    assert mean_reward == pytest.approx(0.5)

    # Passive: always up is penalized at every step
    passive = VecMonitor(TMazeVecEnv(4, corridor_length=corridor_length, variant="passive"))
    rewards, lengths = evaluate_policy(ConstantModel(UP), passive, n_eval_episodes=4, return_episode_rewards=True)
    assert lengths == [corridor_length + 2] * 4
    np.testing.assert_allclose(rewards, -(corridor_length + 2) / corridor_length, rtol=1e-5)


def test_vec_monitor_episode_info():
    venv = VecMonitor(TMazeVecEnv(3, corridor_length=2, variant="passive", noise=False, cues=[1, 1, -1]))
    venv.reset()
    infos = None
    for actions in ([UP, RIGHT, RIGHT], [RIGHT, RIGHT, RIGHT], [RIGHT, UP, UP]):
        _, _, dones, infos = venv.step(np.array(actions))
    assert list(dones) == [False, True, True]
    assert infos[1]["episode"]["r"] == pytest.approx(1.0) and infos[1]["episode"]["l"] == 3
    assert infos[2]["episode"]["r"] == pytest.approx(0.0) and not infos[2]["is_success"]


def test_sb3_ppo_smoke():
    from stable_baselines3 import PPO

    venv = VecMonitor(TMazeVecEnv(4, corridor_length=3, seed=0))
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(256)
    assert model.num_timesteps == 256
    # Episodes (at most 5 steps long) were seen through VecMonitor and `is_success`
    assert len(model.ep_info_buffer) > 0 and len(model.ep_success_buffer) > 0
    assert all(info["l"] <= 5 for info in model.ep_info_buffer)


def test_rgb_rendering_and_make_vec_env_from_the_id():
    """SB3's make_vec_env asks for render_mode="rgb_array" when given an id (the README's usage)."""
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("sb3_elmur/PassiveTMaze-v0", n_envs=2, env_kwargs=dict(corridor_length=5))
    assert venv.reset().shape == (2, 4)
    env = gym.make("sb3_elmur/TMaze-v0", corridor_length=3, render_mode="rgb_array")
    env.reset(options={"cue": 1})
    image = env.render()
    assert image.shape == (3 * 8, 4 * 8, 3) and image.dtype == np.uint8
    assert tuple(image[4, 3 * 8 + 4]) == (40, 180, 40)  # the correct (upper) goal is green
    assert tuple(image[8 + 4, 4]) == (220, 40, 40)  # the agent at the corridor's start


def test_vec_env_corridor_range():
    """With a (low, high) range every episode draws its length; limit and penalty follow that episode's length."""
    venv = TMazeVecEnv(16, corridor_length=(3, 9), variant="passive", seed=0)
    assert venv.corridor_length == (3, 9) and venv.time_limit == 11
    oracle = TMazeOracle(16)
    obs, starts = venv.reset(), np.ones(16, dtype=bool)
    seen, lengths = set(), venv.get_attr("episode_corridor_length")
    steps = np.zeros(16, dtype=int)
    for _ in range(400):
        obs, rewards, dones, infos = venv.step(oracle.act(obs, starts))
        steps += 1
        for i in np.flatnonzero(dones):
            # The oracle walks L steps right and turns: L + 1 steps, reward 1, never a penalty
            assert infos[i]["is_success"] and steps[i] == lengths[i] + 1 and rewards[i] == 1.0
            seen.add(int(lengths[i]))
        steps[dones] = 0
        starts = dones
        lengths = venv.get_attr("episode_corridor_length")
    assert seen == set(range(3, 10))
    # Standing still times out at that episode's L + 2, with a penalty of 1 / L per step
    venv = TMazeVecEnv(4, corridor_length=(2, 6), variant="passive", seed=1)
    venv.reset()
    lengths = np.array(venv.get_attr("episode_corridor_length"))
    returns, done_at = np.zeros(4), np.zeros(4, dtype=int)
    for t in range(1, 9):
        _, rewards, dones, _ = venv.step(np.full(4, LEFT))
        returns += rewards * (done_at == 0)
        done_at[(done_at == 0) & dones] = t
    np.testing.assert_array_equal(done_at, lengths + 2)
    np.testing.assert_allclose(returns, -(lengths + 2) / lengths, rtol=1e-6)
    for bad in [(5, 4), (0, 3), (1, 2, 3)]:
        with pytest.raises(ValueError, match="corridor_length"):
            TMazeVecEnv(2, corridor_length=bad)
