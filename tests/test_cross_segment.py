"""Cross-segment attention (``ElmurConfig.cross_segment_attention``, an extension beyond the paper): what a token
sees, and that acting equals training with it on, for every algorithm, buffer and observation kind."""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.model import ElmurModel
from tests import test_bc, test_model, test_policies, test_ppo

torch.set_num_threads(1)

MODES = ["previous", "window"]


def _influence(mode: str, context_length: int = 4, n_layers: int = 2, t: int = 16, changed: int = 2) -> list:
    """Which steps' outputs change when the input at step ``changed`` does, with no memory read (attention only)."""
    model = test_model._model(n_layers=n_layers, context_length=context_length, use_memory_read=False,
                              cross_segment_attention=mode)
    x = torch.randn(1, t, 5)
    y = x.clone()
    y[0, changed] += 1.0
    with torch.no_grad():
        a, _ = model(x, model.initial_state(1))
        b, _ = model(y, model.initial_state(1))
    return [step for step in range(t) if (a[0, step] - b[0, step]).abs().max() > 1e-6]


def test_what_a_token_attends_to():
    """Off (the paper): a token sees its own segment only. "previous": also the whole previous segment, in every
    layer, so an input reaches one segment further per layer. "window": the last K steps in every layer."""
    assert _influence("off") == [2, 3]
    assert _influence("previous", n_layers=1) == [2, 3, 4, 5, 6, 7]
    assert _influence("previous", n_layers=2) == list(range(2, 12))
    assert _influence("window", n_layers=1) == [2, 3, 4, 5]  # steps 2 .. 2 + K - 1
    assert _influence("window", n_layers=2) == [2, 3, 4, 5, 6, 7, 8]  # 2 .. 2 + 2 (K - 1)


def test_nothing_crosses_an_episode_start():
    model = test_model._model(cross_segment_attention="previous", use_memory_read=False)
    x = torch.randn(1, 12, 5)
    y = x.clone()
    y[0, 1] += 1.0
    starts = torch.zeros(1, 12, dtype=torch.bool)
    starts[0, 4] = True  # a new episode at the segment boundary: its first segment has no previous one
    with torch.no_grad():
        a, _ = model(x, model.initial_state(1), starts)
        b, _ = model(y, model.initial_state(1), starts)
    assert (a[0, 4:] - b[0, 4:]).abs().max() == 0


@pytest.mark.parametrize("kwargs", [
    {"cross_segment_attention": "previous"},
    {"cross_segment_attention": "window", "norm": "pre"},
    {"cross_segment_attention": "previous", "n_layers": 3, "memory_size": 1},
    {"cross_segment_attention": "window", "context_length": 1, "memory_size": 1},
])
def test_step_equals_sequence(kwargs):
    """Step by step with the cached layer outputs (dropped once, as after unpacking), in chunks, and in one call:
    the same outputs and states, episode starts at any phase of a segment included."""
    model = test_model._model(**kwargs)
    gen = torch.Generator().manual_seed(3)
    n, t = 5, 37
    _, state = model(torch.randn(n, 7, 5, generator=gen), model.initial_state(n))
    x = torch.randn(n, t, 5, generator=gen)
    starts = torch.rand(n, t, generator=gen) < 0.08
    starts[0, 5] = starts[1, 0] = starts[2, 4] = True
    with torch.no_grad():
        seq_out, seq_state = model(x, state, starts)
        chunk_out, chunk_state = model(x[:, :13], state, starts[:, :13])
        rest_out, chunk_state = model(x[:, 13:], chunk_state, starts[:, 13:])
        outputs, step_state = None, state
        for i in range(t):
            if i == 17:
                outputs = None
            out, step_state, outputs = model.step(x[:, i], step_state, starts[:, i], outputs)
            torch.testing.assert_close(out, seq_out[:, i], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([chunk_out, rest_out], dim=1), seq_out, atol=1e-5, rtol=0)
    test_model._assert_states_close(seq_state, step_state)
    test_model._assert_states_close(seq_state, chunk_state)
    assert seq_state.previous.shape == (n, model.config.n_layers, model.config.context_length, 16)


def test_off_keeps_the_papers_model_and_state():
    config = ElmurConfig()
    assert config.cross_segment_attention == "off" and config.previous_length == 0
    model = ElmurModel(5, config)
    assert model.layers[0].relative_bias.shape == (config.n_heads, config.context_length)
    assert model.initial_state(2).previous.shape == (2, config.n_layers, 0, config.d_model)
    wide = ElmurModel(5, ElmurConfig(cross_segment_attention="previous"))
    assert wide.layers[0].relative_bias.shape == (config.n_heads, 2 * config.context_length)
    extra = ElmurConfig(cross_segment_attention="window").state_bytes() - config.state_bytes()
    assert extra == config.n_layers * config.context_length * config.d_model * 4
    with pytest.raises(ValueError, match="cross_segment_attention must be one of"):
        ElmurConfig(cross_segment_attention="xl")


# Every action space, each with one of the two modes (the state does not depend on the action space).
@pytest.mark.parametrize("mode, action_space", zip(MODES * 2, test_ppo.ACTION_SPACES),
                         ids=["discrete-previous", "box-window", "multidiscrete-previous", "multibinary-window"])
def test_elmur_ppo_rollout_matches_training(mode, action_space):
    # A horizon shorter than a segment puts anchors right before loss steps: their stored previous segment counts.
    model = test_ppo._model(action_space, memory_horizon=4, policy_kwargs=dict(cross_segment_attention=mode))
    test_ppo._assert_rollouts_match_training(model)
    assert model.rollout_buffer.anchor_previous.shape[-2:] == (4, 16)


def test_elmur_ppo_keeps_every_other_boundary_under_a_tenth_of_the_packed_state():
    """With cross-segment attention ElmurPPO's buffer keeps the state at every 2K-th episode step (its previous
    segment's inputs are most of it), which at the default config stores per env step under a tenth of RecurrentPPO's
    packed ELMUR state; without it, every K-th."""
    from stable_baselines3.common.env_util import make_vec_env

    for mode, interval in (("off", 4), ("previous", 8)):
        model = test_ppo._model(memory_horizon=4, policy_kwargs=dict(cross_segment_attention=mode))
        model.learn(model.n_steps * model.n_envs)
        buffer = model.rollout_buffer
        times, envs = (buffer.anchor_slots >= 0).nonzero(as_tuple=True)
        steps = buffer.anchor_steps[buffer.anchor_slots[times, envs].long(), envs]
        assert len(steps) and (steps % interval == 0).all() and (steps % (2 * interval) != 0).any(), (mode, steps)
    env = make_vec_env("CartPole-v1", n_envs=8, seed=0)
    buffer = ElmurPPO("ElmurPolicy", env, policy_kwargs=dict(cross_segment_attention="previous")).rollout_buffer
    packed = RecurrentPPO("ElmurPolicy", env, policy_kwargs=dict(cross_segment_attention="previous")).policy
    per_step = buffer.state_nbytes() / (buffer.buffer_size * buffer.n_envs)
    assert per_step <= 2 * packed.lstm_actor.hidden_size * 4 / 10


def test_elmur_ppo_rollout_matches_training_dict_image_and_compiled():
    test_ppo.assert_dict_image_and_compiled_rollouts_match(dict(cross_segment_attention="previous"),
                                                           dict(cross_segment_attention="window"))


@pytest.mark.parametrize("mode, action_space", zip(MODES, [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)]),
                         ids=["discrete-previous", "box-window"])
def test_recurrent_ppo_rollout_matches_training(mode, action_space):
    model = test_policies._model(action_space, cross_segment_attention=mode)
    c = model.policy.lstm_actor.model.config
    off = test_policies._model(action_space).policy.lstm_actor
    # The packed state grows by every layer's inputs over a segment.
    assert 2 * (model.policy.lstm_actor.hidden_size - off.hidden_size) in (c.n_layers * c.context_length * c.d_model + d
                                                                            for d in (-1, 0, 1))
    test_policies._assert_rollout_matches_training(model)


def test_recurrent_ppo_rollout_matches_training_dict_and_image():
    test_policies._assert_rollout_matches_training(test_policies._model(
        spaces.Discrete(2), test_policies.DICT, policy="MultiInputElmurPolicy", cross_segment_attention="window"))
    test_policies._assert_rollout_matches_training(test_policies._model(
        spaces.Discrete(2), test_policies.IMAGE, policy="CnnElmurPolicy", cross_segment_attention="previous",
        features_extractor_kwargs=dict(features_dim=32)))


def test_a_state_without_cross_segment_attention_is_refused():
    with_option = test_policies._model(spaces.Discrete(3), cross_segment_attention="previous").policy
    without = test_policies._model(spaces.Discrete(3)).policy
    _, state = without.predict(np.zeros((4, 3), dtype=np.float32), None, np.ones(4, dtype=bool))
    with pytest.raises(Exception, match="cross_segment_attention='previous'"):
        with_option.predict(np.zeros((4, 3), dtype=np.float32), state, np.zeros(4, dtype=bool))


@pytest.mark.parametrize("mode", MODES)
def test_recurrent_bc_windows_and_burn_in_equal_acting(mode):
    kwargs = dict(test_bc.SMALL_ELMUR, cross_segment_attention=mode)
    test_bc.test_training_windows_compute_what_the_policy_computes_step_by_step("ElmurPolicy", kwargs)
    test_bc.test_a_window_starts_from_the_memory_of_acting_through_its_episode("ElmurPolicy", kwargs)


@pytest.mark.parametrize("algo", ["ElmurPPO", "RecurrentPPO"])
def test_save_load_and_predict(tmp_path, algo):
    """A saved model keeps the option, and predicts the same actions from the same states after loading."""
    cls = ElmurPPO if algo == "ElmurPPO" else RecurrentPPO
    model = (test_ppo._model(policy_kwargs=dict(cross_segment_attention="window")) if algo == "ElmurPPO"
             else test_policies._model(spaces.Discrete(3), cross_segment_attention="window"))
    model.learn(model.n_steps * model.n_envs)
    model.save(tmp_path / "model.zip")
    loaded = cls.load(tmp_path / "model.zip")
    assert loaded.policy.lstm_actor.model.config.cross_segment_attention == "window"
    test_policies.assert_predicts_alike(model, loaded)



@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_carries_the_previous_segment(tmp_path, fmt):
    """The exported step takes and returns the previous segment's inputs as a named state tensor, and equals predict
    over an episode of several segments with mid-episode starts."""
    from tests import test_export

    zip_path = test_export._zip(tmp_path, "ElmurPolicy", "Discrete", cross_segment_attention="previous")
    _, state = test_export._check_episode(zip_path, tmp_path / f"policy.{fmt}", fmt)
    assert state["previous"].shape == (3, 2, 4, 16) and np.abs(state["previous"][0]).max() > 0
    test_export._assert_memory_was_written(state)
