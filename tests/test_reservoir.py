"""Reservoir layers (``ElmurConfig.reservoir_layers``, an extension beyond the paper): fixed random layers beside the
trained ones; acting equals training with them, for every algorithm, buffer and observation kind, and training never
changes them. Step == sequence: ``test_model``'s tests, with reservoirs among their configs."""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common.config import ElmurConfig
from tests import test_bc, test_model, test_policies, test_ppo

torch.set_num_threads(1)

RESERVOIR = dict(reservoir_layers=1)


def test_reservoir_is_fixed_owns_a_memory_and_fills_half_the_output():
    """The embedding and the reservoir's weights are buffers (no gradient, no optimizer), each reservoir layer owns a
    memory row that its writes fill, and the output's second half is the reservoir's: the trained layers leave it
    as it is."""
    model = test_model._model(**RESERVOIR)
    n_trained = model.config.n_layers
    trained = {name for name, _ in model.named_parameters()}
    assert trained and all(name.startswith(("layers.0.", "layers.1.", "ln_out")) for name in trained)
    assert "embed.weight" in dict(model.named_buffers()) and "layers.2.read.query.weight" in dict(model.named_buffers())
    x = torch.randn(2, 9, 5)
    out, state = model(x, model.initial_state(2))
    assert out.shape == (2, 9, 2 * model.config.d_model)
    assert state.memory.shape[1] == model.config.memory_layers == n_trained + 1
    assert (state.positions[:, n_trained] >= 0).any()  # the reservoir's memory was written
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    changed, _ = model(x, model.initial_state(2))
    d = model.config.d_model
    torch.testing.assert_close(changed[..., d:], out[..., d:], atol=0, rtol=0)
    assert not torch.allclose(changed[..., :d], out[..., :d])


def test_default_model_is_unchanged():
    """Without a reservoir (the default) the model has its trained layers only, and its embedding trains."""
    assert ElmurConfig().reservoir_layers == 0 and ElmurConfig().output_dim == ElmurConfig().d_model
    model = test_model._model()
    assert len(model.layers) == model.config.n_layers and model.ln_reservoir_out is None
    assert model.embed.weight.requires_grad


@pytest.mark.parametrize("value", [-1, 1.5, "1", True])
def test_bad_reservoir_layers_is_refused(value):
    with pytest.raises(ValueError, match="ElmurConfig.reservoir_layers must be a non-negative integer"):
        ElmurConfig(reservoir_layers=value)


@pytest.mark.parametrize("action_space", test_ppo.ACTION_SPACES[:2], ids=["discrete", "box"])
def test_elmur_ppo_rollout_matches_training_and_the_reservoir_stays(action_space):
    model = test_ppo._model(action_space, memory_horizon=4, policy_kwargs=RESERVOIR)
    backbone = model.policy.lstm_actor.model
    fixed = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    trained = {name: parameter.clone() for name, parameter in backbone.named_parameters()}
    test_ppo._assert_rollouts_match_training(model)
    for name, buffer in backbone.named_buffers():
        assert torch.equal(buffer, fixed[name]), name
    assert any(not torch.equal(parameter, trained[name]) for name, parameter in backbone.named_parameters())
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(buffer) for buffer in backbone.buffers())


def test_elmur_ppo_rollout_matches_training_dict_image_and_compiled():
    test_ppo.assert_dict_image_and_compiled_rollouts_match(RESERVOIR, dict(RESERVOIR, cross_segment_attention="previous"))


@pytest.mark.parametrize("policy, observation_space", [("ElmurPolicy", test_policies.VECTOR),
                                                       ("MultiInputElmurPolicy", test_policies.DICT)])
def test_recurrent_ppo_rollout_matches_training(policy, observation_space):
    model = test_policies._model(spaces.Discrete(3), observation_space, policy=policy, **RESERVOIR)
    c = model.policy.lstm_actor.model.config
    without = test_policies._model(spaces.Discrete(3), observation_space, policy=policy).policy.lstm_actor
    # The packed state grows by the reservoir layer's memory and slot positions.
    grown = 2 * (model.policy.lstm_actor.hidden_size - without.hidden_size)
    assert grown in (c.memory_size * (c.d_model + 1) + d for d in (-1, 0, 1))
    test_policies._assert_rollout_matches_training(model)


def test_recurrent_bc_windows_and_burn_in_equal_acting():
    kwargs = dict(test_bc.SMALL_ELMUR, **RESERVOIR)
    test_bc.test_training_windows_compute_what_the_policy_computes_step_by_step("ElmurPolicy", kwargs)
    test_bc.test_a_window_starts_from_the_memory_of_acting_through_its_episode("ElmurPolicy", kwargs)


@pytest.mark.parametrize("algo", ["ElmurPPO", "RecurrentPPO"])
def test_save_load_predict_and_a_state_without_the_reservoir_is_refused(tmp_path, algo):
    cls = ElmurPPO if algo == "ElmurPPO" else RecurrentPPO
    model = (test_ppo._model(policy_kwargs=RESERVOIR) if algo == "ElmurPPO"
             else test_policies._model(spaces.Discrete(3), **RESERVOIR))
    model.learn(model.n_steps * model.n_envs)
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip")
    assert loaded.policy.lstm_actor.model.config.reservoir_layers == 1
    for (name, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), name
    test_policies.assert_predicts_alike(model, loaded)
    without = test_policies._model(spaces.Discrete(3), n_layers=2).policy
    _, state = without.predict(np.zeros((2, 3), dtype=np.float32), None, np.ones(2, dtype=bool))
    with pytest.raises(Exception, match="reservoir_layers=1"):
        loaded.policy.predict(np.zeros((2, 3), dtype=np.float32), state, np.zeros(2, dtype=bool))


def test_export_carries_the_reservoirs_memory(tmp_path):
    """The exported step holds the reservoir's memory as rows of the memory tensor, and equals predict over an
    episode of several segments with mid-episode starts."""
    from tests import test_export

    zip_path = test_export._zip(tmp_path, "ElmurPolicy", "Discrete", **RESERVOIR)
    _, state = test_export._check_episode(zip_path, tmp_path / "policy.onnx", "onnx")
    assert state["memory"].shape[1] == test_export.SMALL["n_layers"] + 1
    test_export._assert_memory_was_written(state)
