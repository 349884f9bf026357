"""Bad inputs that used to fail deep inside torch, SB3 or a worker: each is refused early, by a named error that
names the argument, the bad value and what is expected (issue 25, "Obscure errors")."""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.policies import ElmurPolicy, NonFiniteError
from tests.dummy_envs import RandomLengthEnv

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4)


class _NonFiniteObservations(RandomLengthEnv):
    """Its 5th step returns an observation with ``bad`` at index 1."""

    def __init__(self, bad: float) -> None:
        super().__init__(spaces.Discrete(2))
        self.bad, self.n_steps = bad, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.n_steps += 1
        if self.n_steps == 5:
            obs = obs.copy()
            obs[1] = self.bad
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize("algorithm", [RecurrentPPO, ElmurPPO], ids=["RecurrentPPO", "ElmurPPO"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observations_are_named_in_learn(algorithm, bad):
    model = algorithm("ElmurPolicy", _NonFiniteObservations(bad), n_steps=16, batch_size=16, n_epochs=1, seed=0,
                      policy_kwargs=SMALL)
    with pytest.raises(NonFiniteError, match=rf"observation holds 1 NaN or inf value\(s\), the first {bad} at index "
                                             r"\[0, 1\].*VecCheckNan"):
        model.learn(16)


def test_non_finite_observations_are_named_in_predict():
    policy = ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4, **SMALL)
    obs = np.zeros((2, 3), dtype=np.float32)
    obs[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"ElmurPolicy.predict: observation .* nan at index \[1, 2\]"):
        policy.predict(obs)
    policy.predict(np.zeros(3, dtype=np.float32))  # finite ones act as before
    dict_policy = ElmurPolicy(
        spaces.Dict({"a": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "b": spaces.Discrete(3)}),
        spaces.Discrete(3), lambda _: 3e-4, features_extractor_class=sb3_elmur.policies.CombinedExtractor, **SMALL,
    )
    with pytest.raises(NonFiniteError, match=r"observation\['a'\] holds 1 NaN or inf value\(s\), the first -?inf"):
        dict_policy.predict({"a": np.array([0.0, -np.inf], dtype=np.float32), "b": 1})


@pytest.fixture
def eight_gb(monkeypatch):
    """The machine has 8 GB available, whatever this one has: the refusals below do not depend on it."""
    monkeypatch.setattr(sb3_elmur.model, "available_memory_bytes", lambda device=None: 8 * 10**9)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(memory_size=10**8), r"mostly memory_size=100000000: the initial memory"),
        (dict(d_model=2**20), r"mostly d_model=1048576: 2 layers of about 32 x d_model\*\*2 weights"),
        (dict(context_length=10**7), r"mostly context_length=10000000: per layer, context_length\*\*2"),
        (dict(distance_bias="clamped", max_distance=10**10), r"mostly max_distance=10000000000"),
    ],
)
def test_huge_sizes_are_refused_before_allocating(eight_gb, kwargs, named):
    config = sb3_elmur.ElmurConfig(**kwargs)  # a config alone allocates nothing
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=rf"ElmurModel with .*\({named}.*\) needs about "
                                                               r"[\d.]+ [TGP]B, more than the 8.0 GB of RAM available"):
        sb3_elmur.ElmurModel(4, config)
    argument = named.split()[1].split("=")[0]
    with pytest.raises(ValueError, match=rf"ElmurPolicy with .*\(mostly {argument}=.*reduce {argument}"):  # both
        ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4, **kwargs)


def test_policy_counts_its_recurrent_states(eight_gb):
    # 4.1 GB of model (initial memory and its temporary), three states of 2.1 GB: more than 8 GB.
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=r"memory_size=4000000 and context_length=10: 3 "
                                                               r"recurrent state\(s\) of 2.1 GB each"):
        ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4,
                    memory_size=4_000_000)


def test_huge_memory_horizon_is_refused_before_allocating(eight_gb):
    env = RandomLengthEnv(spaces.Discrete(2))
    with pytest.raises(ValueError, match=r"memory_horizon must be a non-negative integer, got 2000000.0"):
        ElmurPPO("ElmurPolicy", env, memory_horizon=2e6, policy_kwargs=SMALL)
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=r"ElmurPPO with memory_horizon=2000000, n_steps=128, "
                                                               r"n_envs=1 .*training activations of 4 row\(s\) of up to "
                                                               r"2000035 steps.*reduce memory_horizon"):
        ElmurPPO("ElmurPolicy", env, memory_horizon=2 * 10**6, policy_kwargs=SMALL)
    ElmurPPO("ElmurPolicy", env, memory_horizon=1000, policy_kwargs=SMALL)  # a sensible one still fits


def test_elmur_ppo_names_the_algorithm_of_other_policies():
    env = RandomLengthEnv(spaces.Discrete(2))
    with pytest.raises(ValueError, match=r"got policy='MlpLstmPolicy': 'MlpLstmPolicy' is a policy of sb3-contrib's "
                                         r"RecurrentPPO: use RecurrentPPO\('MlpLstmPolicy', env\)"):
        ElmurPPO("MlpLstmPolicy", env)
    with pytest.raises(ValueError, match=r"one of \['CnnElmurPolicy', 'ElmurPolicy', 'MultiInputElmurPolicy'\], "
                                         r"got policy='Big'"):
        ElmurPPO("Big", env)


@pytest.mark.parametrize("net_arch", ["big", [64, "64"], [0], dict(pi=[64], qf=[64]), dict(pi="big")])
def test_bad_net_arch_is_named(net_arch):
    env = RandomLengthEnv(spaces.Discrete(2))
    for algorithm in (RecurrentPPO, ElmurPPO):
        with pytest.raises(ValueError, match=r"net_arch must be None, a list of positive layer widths .*, got "):
            algorithm("ElmurPolicy", env, policy_kwargs=dict(net_arch=net_arch, **SMALL))
    ElmurPPO("ElmurPolicy", env, policy_kwargs=dict(net_arch=dict(pi=[8], vf=[]), **SMALL))  # good ones still work


def test_images_smaller_than_nature_cnn_takes_are_named():
    small = spaces.Box(0, 255, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"observation is an image of 32x32 pixels .* at least 36x36. Resize"):
        ElmurPPO("CnnElmurPolicy", RandomLengthEnv(spaces.Discrete(2), small), policy_kwargs=SMALL)
    dict_space = spaces.Dict({"camera": small, "state": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"observation\['camera'\] is an image of 32x32 pixels"):
        RecurrentPPO("MultiInputElmurPolicy", RandomLengthEnv(spaces.Discrete(2), dict_space), policy_kwargs=SMALL)
    # 36 x 36 is the smallest that works, channel-first or channel-last.
    for shape in ((36, 36, 1), (1, 36, 40)):
        model = ElmurPPO("CnnElmurPolicy", RandomLengthEnv(spaces.Discrete(2), spaces.Box(0, 255, shape, np.uint8)),
                         n_steps=8, batch_size=8, n_epochs=1, policy_kwargs=SMALL)
        model.learn(8)


@pytest.mark.parametrize("actions", [[0, 1, 2], [[0, 1], [2, 3], [0, 0]], 1])
def test_tmaze_step_names_a_wrong_number_of_actions(actions):
    env = TMazeVecEnv(4, seed=0)
    env.reset()
    with pytest.raises(ValueError, match=r"TMazeVecEnv.step expects one action per env, 4 actions, got \d"):
        env.step(np.array(actions))
    env.step(np.array([2, 2, 2, 2]))  # the env is still usable


@pytest.mark.parametrize("seed", ["abc", -1, 1.5, True])
def test_maniskill_seed_is_checked_before_any_work(monkeypatch, seed):
    import sb3_elmur.envs.maniskill as maniskill

    def no_work(*args, **kwargs):
        raise AssertionError("the seed must be refused before the task is looked up or a worker starts")

    monkeypatch.setattr(maniskill, "check_task", no_work)
    monkeypatch.setattr(maniskill, "_check_observation_settings", no_work)
    with pytest.raises(ValueError, match=rf"ManiSkillVecEnv seed must be a non-negative integer, got {seed!r}"):
        maniskill.ManiSkillVecEnv("PickCube-v1", seed=seed, sim_backend="cpu")
