import copy
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur.common.policies import (
    CnnElmurPolicy,
    ElmurPolicy,
    MultiInputElmurPolicy,
    NonFiniteError,
    RecurrentStateError,
)
from tests.dummy_envs import NonFiniteStepEnv, RandomLengthEnv

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4, alpha=0.5, memory_init_std=0.5)

VECTOR = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
DICT = spaces.Dict({"position": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "flag": spaces.Discrete(3)})
IMAGE = spaces.Box(0, 255, (36, 36, 1), dtype=np.uint8)


def _model(action_space, observation_space=VECTOR, policy="ElmurPolicy", n_envs=4, **policy_kwargs):
    env = make_vec_env(
        RandomLengthEnv,
        n_envs=n_envs,
        seed=0,
        env_kwargs=dict(action_space=action_space, observation_space=observation_space),
    )
    return RecurrentPPO(
        policy, env, n_steps=48, batch_size=40, n_epochs=1, seed=0, policy_kwargs={**SMALL, **policy_kwargs}
    )


def assert_predicts_alike(model, other, steps: int = 15) -> None:
    """Two models (one saved, the other loaded from it) predict the same greedy actions and states, step by step on
    2 envs of 3-float observations, one restarting mid-episode."""
    rng = np.random.default_rng(0)
    states = [None, None]
    for t in range(steps):
        obs = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
        starts = np.array([t == 0, t in (0, 9)])
        actions = []
        for i, m in enumerate((model, other)):
            action, states[i] = m.predict(obs, states[i], starts, deterministic=True)
            actions.append(action)
        np.testing.assert_array_equal(actions[0], actions[1])
        np.testing.assert_allclose(states[0][0], states[1][0], atol=1e-6)


def _assert_rollout_matches_training(model) -> None:
    """Log-probs and values recomputed over every stored minibatch equal those computed while acting."""
    _, callback = model._setup_learn(10_000, None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert model.rollout_buffer.episode_starts[1:].sum() >= 4  # episodes ended at different steps
    model.policy.set_training_mode(True)
    assert_minibatches_match_rollout(model)


def assert_minibatches_match_rollout(model) -> None:
    """Every minibatch of ``model``'s rollout buffer: the log-probs and values recomputed over its stored
    sequences equal those stored while acting (to 1e-5), and together they cover every step of the rollout."""
    n_checked = 0
    for data in model.rollout_buffer.get(model.batch_size):
        actions = data.actions
        if isinstance(model.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        with torch.no_grad():
            values, log_prob, _ = model.policy.evaluate_actions(
                data.observations, actions, data.lstm_states, data.episode_starts
            )
        mask = data.mask > 1e-8
        torch.testing.assert_close(log_prob[mask], data.old_log_prob[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(values.flatten()[mask], data.old_values[mask], atol=1e-5, rtol=0)
        n_checked += int(mask.sum())
    assert n_checked == model.n_steps * model.n_envs


@pytest.mark.parametrize(
    "action_space",
    [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), spaces.MultiDiscrete([3, 2]), spaces.MultiBinary(3)],
    ids=["discrete", "box", "multidiscrete", "multibinary"],
)
@pytest.mark.parametrize("shared_backbone", [True, False], ids=["shared", "separate"])
def test_rollout_matches_training_vector(action_space, shared_backbone):
    _assert_rollout_matches_training(_model(action_space, shared_backbone=shared_backbone))


@pytest.mark.parametrize("detach_critic", [False, True])
def test_value_loss_trains_shared_backbone_unless_detached(detach_critic):
    model = _model(spaces.Discrete(3), detach_critic=detach_critic)
    policy = model.policy
    obs = torch.randn(4 * 6, 3)
    states = RNNStates(*[(torch.zeros(1, 4, policy.lstm_actor.hidden_size),) * 2] * 2)
    values, _, _ = policy.evaluate_actions(obs, torch.zeros(4 * 6), states, torch.zeros(4 * 6))
    values.sum().backward()
    backbone_grad = sum(p.grad.abs().sum() for p in policy.lstm_actor.parameters() if p.grad is not None)
    assert policy.value_net.weight.grad.abs().sum() > 0
    assert (backbone_grad == 0) == detach_critic


def test_rollout_matches_training_pre_norm():
    """The pre-norm layer order (an option; post-norm is the default, docs/model.md) keeps rollout equal to training."""
    _assert_rollout_matches_training(_model(spaces.Discrete(3), norm="pre"))


def test_rollout_matches_training_dict_observation():
    model = _model(spaces.Discrete(2), DICT, policy="MultiInputElmurPolicy")
    assert isinstance(model.policy, MultiInputElmurPolicy)
    _assert_rollout_matches_training(model)


def test_rollout_matches_training_image_observation():
    model = _model(spaces.Discrete(2), IMAGE, policy="CnnElmurPolicy", features_extractor_kwargs=dict(features_dim=32))
    assert isinstance(model.policy, CnnElmurPolicy)
    _assert_rollout_matches_training(model)


def test_policy_aliases_registered():
    for name, cls in (("ElmurPolicy", ElmurPolicy), ("CnnElmurPolicy", CnnElmurPolicy), ("MultiInputElmurPolicy", MultiInputElmurPolicy)):
        assert RecurrentPPO.policy_aliases[name] is cls


def test_episode_start_resets_only_that_env():
    model = _model(spaces.Discrete(3), n_envs=2)
    policy = model.policy
    rng = np.random.default_rng(0)
    state = None
    for _ in range(7):  # build up memory and a partial segment in both envs
        _, state = policy.predict(rng.uniform(-1, 1, (2, 3)).astype(np.float32), state, np.zeros(2, dtype=bool))
    obs = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
    features = policy.extract_features(torch.as_tensor(obs))
    packed = tuple(torch.as_tensor(s) for s in state)
    zeros = tuple(torch.zeros_like(s) for s in packed)
    with torch.no_grad():
        latent, _ = policy._process_sequence(features, packed, torch.tensor([1.0, 0.0]), policy.lstm_actor)
        fresh, _ = policy._process_sequence(features, zeros, torch.zeros(2), policy.lstm_actor)
        kept, _ = policy._process_sequence(features, packed, torch.zeros(2), policy.lstm_actor)
    torch.testing.assert_close(latent[0], fresh[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(latent[1], kept[1], atol=1e-6, rtol=0)
    assert (kept[0] - fresh[0]).abs().max() > 1e-4


def test_packed_state_roundtrip_is_exact():
    model = _model(spaces.Discrete(3), n_envs=3)
    backbone = model.policy.lstm_actor
    x = torch.randn(3, 23, backbone.input_size)
    _, state = backbone.model(x, backbone.model.initial_state(3))
    unpacked = backbone.unpack(backbone.pack(state))
    for a, b in zip(state, unpacked):
        assert a.dtype == b.dtype and torch.equal(a, b)
    hidden, cell = backbone.pack(state)
    assert hidden.shape == cell.shape == (1, 3, backbone.hidden_size)
    # A fresh (all-zero) row next to packed rows unpacks to the initial state.
    mixed = backbone.unpack((torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, 1:]], dim=1), cell))
    for a, b, init in zip(state, mixed, backbone.model.initial_state(3)):
        assert torch.equal(b[0], init[0]) and torch.equal(b[1:], a[1:])


def test_predict_and_evaluate_single_env_and_vecenv():
    model = _model(spaces.Discrete(3), n_envs=2)
    env = RandomLengthEnv(spaces.Discrete(3))
    obs, _ = env.reset(seed=1)
    action, state = model.predict(obs, deterministic=True)
    assert env.action_space.contains(int(action)) and state[0].shape == (1, 1, model.policy.lstm_actor.hidden_size)
    action, state = model.predict(obs, state=state, episode_start=np.array([False]), deterministic=True)
    mean, _ = evaluate_policy(model, model.env, n_eval_episodes=4)
    assert np.isfinite(mean)


def test_learn_with_callbacks_and_progress_bar(tmp_path):
    model = _model(spaces.Discrete(3), n_envs=2)
    model.tensorboard_log = str(tmp_path)
    model.learn(200, progress_bar=True, tb_log_name="elmur")
    assert model.num_timesteps >= 200
    assert any(tmp_path.rglob("events.out.tfevents.*"))


def test_save_load_in_new_process_reproduces_actions(tmp_path):
    model = _model(spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), n_envs=2, shared_backbone=False, n_layers=1)
    model.learn(100)
    rng = np.random.default_rng(0)
    observations = rng.uniform(-1, 1, (9, 2, 3)).astype(np.float32)
    starts = np.zeros((9, 2), dtype=bool)
    starts[4, 1] = True
    state, actions = None, []
    for obs, start in zip(observations, starts):
        action, state = model.predict(obs, state, start, deterministic=True)
        actions.append(action)
    model.save(tmp_path / "elmur")
    np.savez(tmp_path / "data.npz", observations=observations, starts=starts, actions=np.array(actions), h=state[0], c=state[1])
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        import sb3_elmur
        from sb3_contrib import RecurrentPPO
        model = RecurrentPPO.load({str(tmp_path / 'elmur')!r})
        data = np.load({str(tmp_path / 'data.npz')!r})
        state, actions = None, []
        for obs, start in zip(data["observations"], data["starts"]):
            action, state = model.predict(obs, state, start, deterministic=True)
            actions.append(action)
        assert np.allclose(np.array(actions), data["actions"], atol=1e-6), "actions differ"
        assert np.array_equal(state[0], data["h"]) and np.array_equal(state[1], data["c"]), "states differ"
        print("ok", model.policy.elmur_config.n_layers, type(model.policy).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 1 ElmurPolicy"


def test_unsupported_configurations_raise_clear_errors():
    env = RandomLengthEnv(spaces.Box(-1.0, 1.0, (2,), dtype=np.float32))
    with pytest.raises(ValueError, match="gSDE"):
        RecurrentPPO("ElmurPolicy", env, use_sde=True)
    with pytest.raises(ValueError, match="n_heads"):
        _model(spaces.Discrete(2), d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="lstm_hidden_size"):
        _model(spaces.Discrete(2), lstm_hidden_size=64)
    with pytest.raises(ValueError, match="share_features_extractor"):
        _model(spaces.Discrete(2), share_features_extractor=False)


def test_bad_spaces_and_observations_are_named_in_the_error():
    tuple_space = spaces.Tuple((spaces.Discrete(3), spaces.Discrete(2)))
    with pytest.raises(NotImplementedError, match="Tuple"):
        RecurrentPPO("ElmurPolicy", RandomLengthEnv(spaces.Discrete(2), tuple_space))
    with pytest.raises(AssertionError, match="Tuple"):
        RecurrentPPO("ElmurPolicy", RandomLengthEnv(tuple_space))
    model = _model(spaces.Discrete(2), n_envs=1)
    with pytest.raises(ValueError, match="observation shape"):
        model.predict(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown ElmurPolicy keyword"):
        _model(spaces.Discrete(2), memory_slots=4)


def _policy(**kwargs) -> ElmurPolicy:
    return ElmurPolicy(VECTOR, spaces.Discrete(3), lambda _: 3e-4, **{**SMALL, **kwargs})


def test_state_of_another_layout_or_size_is_refused():
    policy = _policy()
    obs = np.zeros((2, 3), dtype=np.float32)
    _, state = policy.predict(obs)
    _, state = policy.predict(obs, state)  # its own state, and all-zero rows, are accepted
    # Same packed size, another layout: only the tag tells them apart.
    other = _policy(d_model=8, context_length=11)
    assert other.lstm_actor.hidden_size == policy.lstm_actor.hidden_size
    _, other_state = other.predict(obs)
    expected = r"not made by an ElmurPolicy with ElmurConfig\(d_model=16, n_layers=2, memory_size=2, context_length=4\)"
    with pytest.raises(RecurrentStateError, match=expected):
        policy.predict(obs, other_state)
    mixed = tuple(np.concatenate([np.zeros_like(s[:, :1]), s[:, 1:]], axis=1) for s in other_state)
    with pytest.raises(RecurrentStateError, match="row 1 has layout tag"):
        policy.predict(obs, mixed)
    # Larger ELMUR config, LSTM states of any size: named sizes, not a split_with_sizes error.
    _, large_state = _policy(memory_size=4).predict(obs)
    size = policy.lstm_actor.hidden_size
    expected = f"size {large_state[0].shape[-1]}, but this policy's packed state has size {size}"
    with pytest.raises(RecurrentStateError, match=expected):
        policy.predict(obs, large_state)
    lstm = RecurrentPPO("MlpLstmPolicy", RandomLengthEnv(spaces.Discrete(3)), policy_kwargs=dict(lstm_hidden_size=size))
    _, lstm_state = lstm.predict(obs)
    with pytest.raises(RecurrentStateError, match="not made by an ElmurPolicy"):
        policy.predict(obs, lstm_state)
    for bad, message in (
        (state[0], "pair of arrays"),
        ((state[0], state[1], state[1]), "length 3"),
        ((state[0][0], state[1][0]), "got shapes"),
    ):
        with pytest.raises(RecurrentStateError, match=message):
            policy.predict(obs, bad)
    with pytest.raises(RecurrentStateError, match="not made by an ElmurPolicy"):  # the backbone checks too
        policy.lstm_actor.unpack(tuple(torch.as_tensor(s) for s in other_state))


def test_batch_mismatch_names_the_three_sizes():
    policy = _policy()
    _, state = policy.predict(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(RecurrentStateError, match="4 observations, a recurrent state for 2 envs and 4 episode starts"):
        policy.predict(np.zeros((4, 3), dtype=np.float32), state)
    with pytest.raises(RecurrentStateError, match="2 observations, a recurrent state for 2 envs and 3 episode starts"):
        policy.predict(np.zeros((2, 3), dtype=np.float32), state, np.zeros(3, dtype=bool))
    packed = tuple(torch.as_tensor(s) for s in state)
    backbone = policy.lstm_actor
    with pytest.raises(RecurrentStateError, match="5 feature rows, a recurrent state for 2 sequences and 5 episode"):
        backbone(torch.zeros(5, backbone.input_size), packed, torch.zeros(5))
    with pytest.raises(RecurrentStateError, match="6 feature rows, a recurrent state for 2 sequences and 4 episode"):
        backbone(torch.zeros(6, backbone.input_size), packed, torch.zeros(4))
    with pytest.raises(ValueError, match=r"features of shape \[rows, 3\]"):
        backbone(torch.zeros(6, 5), packed, torch.zeros(6))


@pytest.mark.parametrize("bad_reward", [float("nan"), float("inf")])
def test_non_finite_rewards_stop_training_before_any_update(bad_reward):
    model = RecurrentPPO("ElmurPolicy", NonFiniteStepEnv(bad_reward, "reward"), n_steps=16, batch_size=16, n_epochs=1, seed=0,
                         policy_kwargs=SMALL)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(NonFiniteError, match="step was skipped, so the parameters are unchanged.*VecCheckNan"):
        model.learn(16)
    for name, value in model.policy.state_dict().items():
        assert torch.equal(value, before[name]) and value.isfinite().all(), name


def _assert_step_refuses_nan_gradient(policy) -> None:
    parameter = policy.value_net.weight
    before = parameter.detach().clone()
    policy.optimizer.zero_grad()
    parameter.grad = torch.full_like(parameter, float("nan"))
    with pytest.raises(NonFiniteError, match=r"value_net\.weight"):
        policy.optimizer.step()
    assert torch.equal(parameter.detach(), before)


def test_finite_gradient_check_survives_save_load_and_copies(tmp_path):
    model = RecurrentPPO("ElmurPolicy", RandomLengthEnv(spaces.Discrete(2)), n_steps=16, batch_size=16, policy_kwargs=SMALL)
    model.save(tmp_path / "elmur")
    loaded = RecurrentPPO.load(tmp_path / "elmur")
    for policy in (model.policy, loaded.policy, copy.deepcopy(model.policy), pickle.loads(pickle.dumps(model.policy))):
        _assert_step_refuses_nan_gradient(policy)
        assert len(policy.optimizer._optimizer_step_pre_hooks) == 1
    policy = model.policy
    policy.optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)  # a replaced optimizer is checked too
    _assert_step_refuses_nan_gradient(policy)
    # Huge but finite gradients (their norm overflows float32) still step.
    policy.value_net.weight.grad = torch.full_like(policy.value_net.weight, 1e30)
    policy.optimizer.step()
    assert policy.value_net.weight.isfinite().all() and policy.value_net.weight.abs().min() > 1e28


def test_thread_warning_once_for_small_models_on_cpu():
    obs = np.zeros((1, 3), dtype=np.float32)
    torch.set_num_threads(2)
    try:
        policy = _policy()
        expected = r"small model \(.* parameters\) on CPU with torch using 2 threads.*torch\.set_num_threads\(1\)"
        with pytest.warns(UserWarning, match=expected):
            _, state = policy.predict(obs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            policy.predict(obs, state)  # once per policy, not per step
    finally:
        torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _policy().predict(obs)  # one thread: no warning
