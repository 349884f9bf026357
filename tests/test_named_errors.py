"""Bad inputs that used to fail deep inside torch, SB3 or a worker: each is refused early, by a named error that
names the argument, the bad value and what is expected (issue 25, "Obscure errors")."""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO
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
