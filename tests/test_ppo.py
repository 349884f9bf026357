"""ElmurPPO and its rollout buffer: acting equals training over stored sequences, memory credit across rollouts,
storage, and the SB3 conventions (save/load, predict, callbacks, tensorboard)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.common.actor import ElmurActor
from tests.dummy_envs import RandomLengthEnv
from tests.test_policies import assert_minibatches_match_rollout

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4, alpha=0.5, memory_init_std=0.5)
VECTOR = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
DICT = spaces.Dict({"position": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "flag": spaces.Discrete(3)})
IMAGE = spaces.Box(0, 255, (36, 36, 1), dtype=np.uint8)
ACTION_SPACES = [spaces.Discrete(3), spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), spaces.MultiDiscrete([3, 2]),
                 spaces.MultiBinary(3)]


def _model(action_space=spaces.Discrete(3), observation_space=VECTOR, policy="ElmurPolicy", n_envs=3, **kwargs):
    env = make_vec_env(RandomLengthEnv, n_envs=n_envs, seed=0,
                       env_kwargs=dict(action_space=action_space, observation_space=observation_space))
    policy_kwargs = {**SMALL, **kwargs.pop("policy_kwargs", {})}
    kwargs = {**dict(n_steps=30, batch_size=20, n_epochs=2, sequence_length=10, memory_horizon=13, seed=0), **kwargs}
    return ElmurPPO(policy, env, policy_kwargs=policy_kwargs, **kwargs)


class CheckRolloutMatchesTraining(BaseCallback):
    """After every rollout, before the update: the log-probs and values recomputed over every minibatch of
    stored sequences equal those computed while acting."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts, self.episode_starts = 0, 0

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        self.rollouts += 1
        self.episode_starts += int(buffer.episode_starts[buffer.history_length + 1 :].sum())
        assert_minibatches_match_rollout(self.model)


def _assert_rollouts_match_training(model, rollouts: int = 3) -> None:
    check = CheckRolloutMatchesTraining()
    model.learn(rollouts * model.n_steps * model.n_envs, callback=check)
    assert check.rollouts == rollouts and check.episode_starts >= 2  # episodes end mid-rollout and cross rollouts


def assert_dict_image_and_compiled_rollouts_match(policy_kwargs: dict, compiled_policy_kwargs: dict) -> None:
    """Rollout == training with a model option on, for Dict and image observations (``policy_kwargs``) and with
    compiled acting (``compiled_policy_kwargs``)."""
    _assert_rollouts_match_training(_model(observation_space=DICT, policy="MultiInputElmurPolicy", memory_horizon=0,
                                           policy_kwargs=policy_kwargs), rollouts=2)
    image = _model(observation_space=IMAGE, memory_horizon=4, policy="CnnElmurPolicy", n_envs=2,
                   policy_kwargs=dict(policy_kwargs, features_extractor_kwargs=dict(features_dim=16)))
    _assert_rollouts_match_training(image, rollouts=2)
    compiled = _model(compile_acting=True, n_envs=2, memory_horizon=4, policy_kwargs=compiled_policy_kwargs)
    _assert_rollouts_match_training(compiled, rollouts=2)


@pytest.mark.parametrize("action_space", ACTION_SPACES, ids=["discrete", "box", "multidiscrete", "multibinary"])
@pytest.mark.parametrize("memory_horizon", [0, 13], ids=["no-horizon", "horizon"])
def test_rollout_matches_training(action_space, memory_horizon):
    """Three rollouts with updates between them: the later ones start from the previous rollout's history,
    rebuilt under the updated parameters."""
    _assert_rollouts_match_training(_model(action_space, memory_horizon=memory_horizon))


def test_rollout_matches_training_dict_and_image_observations():
    _assert_rollouts_match_training(_model(observation_space=DICT, policy="MultiInputElmurPolicy"), rollouts=2)
    model = _model(observation_space=IMAGE, policy="CnnElmurPolicy", n_envs=2,
                   policy_kwargs=dict(features_extractor_kwargs=dict(features_dim=16)))
    _assert_rollouts_match_training(model, rollouts=2)


def test_rollout_matches_training_pre_norm():
    _assert_rollouts_match_training(_model(policy_kwargs=dict(norm="pre")), rollouts=2)


def test_sequence_longer_than_the_rollout_and_long_horizon():
    """One sequence per env per rollout, and a horizon reaching back more than a whole rollout."""
    _assert_rollouts_match_training(_model(sequence_length=30, memory_horizon=70, batch_size=60), rollouts=4)


@pytest.mark.parametrize("algo", [ElmurPPO, RecurrentPPO], ids=["ElmurPPO", "RecurrentPPO"])
def test_frozen_backbone_trains_only_the_heads_and_stays_frozen_after_load(algo, tmp_path):
    env = make_vec_env(RandomLengthEnv, n_envs=3, seed=0, env_kwargs=dict(action_space=spaces.Discrete(3),
                                                                         observation_space=VECTOR))
    kwargs = dict(sequence_length=10, memory_horizon=13) if algo is ElmurPPO else {}
    model = algo("ElmurPolicy", env, n_steps=30, batch_size=30, n_epochs=2, seed=0,
                 policy_kwargs=dict(**SMALL, freeze_backbone=True), **kwargs)
    backbone = {name: p.clone() for name, p in model.policy.lstm_actor.named_parameters()}
    heads = model.policy.action_net.weight.clone()
    if algo is ElmurPPO:
        _assert_rollouts_match_training(model, rollouts=2)
    else:
        model.learn(60)
    for name, parameter in model.policy.lstm_actor.named_parameters():
        torch.testing.assert_close(parameter, backbone[name], atol=0, rtol=0)
    assert not torch.equal(model.policy.action_net.weight, heads)
    model.save(tmp_path / "frozen")
    loaded = algo.load(tmp_path / "frozen", env=env)
    assert loaded.policy.freeze_backbone
    assert not any(p.requires_grad for p in loaded.policy.lstm_actor.parameters())
    optimized = {id(p) for group in loaded.policy.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in loaded.policy.lstm_actor.parameters())


def test_episode_start_resets_only_that_env():
    model = _model(n_envs=2)
    actor = ElmurActor(model.policy, 2)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _ in range(7):  # memory and a partial segment in both envs
            actor.step(torch.as_tensor(rng.uniform(-1, 1, (2, 3)), dtype=torch.float32), torch.zeros(2, dtype=torch.bool))
        obs = torch.as_tensor(rng.uniform(-1, 1, (2, 3)), dtype=torch.float32)
        mixed = actor.step(obs, torch.tensor([True, False]), commit=False)[0]
        kept = actor.step(obs, torch.tensor([False, False]), commit=False)[0]
        fresh = ElmurActor(model.policy, 2).step(obs, torch.tensor([True, True]))[0]
    torch.testing.assert_close(mixed[0], fresh[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], kept[1], atol=1e-6, rtol=0)
    assert (kept[0] - fresh[0]).abs().max() > 1e-4


@pytest.mark.parametrize("memory_horizon, reached", [(0, False), (12, True)])
def test_gradient_reaches_a_write_of_the_previous_rollout_only_within_the_horizon(memory_horizon, reached):
    """The first training sequence of the second rollout: the losses' gradient reaches the observations of the
    previous rollout's last completed segment (through its memory write) when the horizon covers it."""
    env = TMazeVecEnv(2, corridor_length=100, variant="passive", seed=0)  # no episode ends in 16 steps
    model = ElmurPPO("ElmurPolicy", env, n_steps=8, batch_size=8, sequence_length=8, memory_horizon=memory_horizon,
                     policy_kwargs=dict(SMALL, memory_init_std=0.0), seed=0)
    _, callback = model._setup_learn(16, None)
    for _ in range(2):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    table = {key: value[:1] for key, value in buffer.sequences().items()}  # env 0, rollout steps 0-7
    anchor, first = int(table["anchor"]), int(table["first"])
    data = buffer.samples(table)
    obs = data.observations.clone().requires_grad_(True)
    _, log_prob, _ = model.policy.evaluate_actions(obs, data.actions.long().flatten(), data.states,
                                                   data.episode_starts)
    log_prob[data.mask > 0.5].sum().backward()
    # Steps 0-7 of the episode are the previous rollout; its segments [0, 4) and [4, 8) completed there.
    earlier = [j for j in range(first - anchor) if anchor + j < first - 3]
    assert bool(earlier) == reached
    if reached:
        assert all(float(obs.grad[j].abs().sum()) > 0 for j in earlier)


def test_training_rows_are_cut_at_episode_starts():
    """Memory restarts with an episode, so a training row never runs on past one: every row holds loss steps, and
    an episode starts, if at all, only at its first step (padding, which repeats a row's last step, repeats no
    episode start: each would open a segment and lengthen the segment-parallel pass)."""
    model = _model(n_steps=30, sequence_length=30, memory_horizon=20, batch_size=90)
    _, callback = model._setup_learn(180, None)
    for _ in range(2):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    assert int(buffer.episode_starts[buffer.history_length + 1:].sum()) >= 2
    rows = 0
    for data in buffer.get(model.batch_size):
        n = data.states.step.shape[0]
        mask, starts = data.mask.view(n, -1) > 0.5, data.episode_starts.view(n, -1) > 0.5
        assert mask.any(dim=1).all()
        assert not starts[:, 1:].any()
        rows += n
    assert rows > model.n_envs  # the 3 sequences were cut into more rows
    # A one-step row that starts an episode, padded beside a longer one of the same episode.
    time, env = buffer.episode_starts[buffer.history_length:-3].nonzero()[0].tolist()
    start = buffer.history_length + time
    table = {"env": torch.tensor([env, env]), "anchor": torch.tensor([start, start]),
             "first": torch.tensor([start, start]), "end": torch.tensor([start + 1, start + 3])}
    data = buffer.samples(table)
    starts = data.episode_starts.view(2, -1) > 0.5
    assert starts.shape[1] >= 3 and starts[:, 0].all() and not starts[:, 1:].any()


def test_stores_a_tenth_of_the_packed_state_per_step_at_the_default_config():
    """State bytes per env step, from the buffers' own arrays: ElmurPPO's anchors and history against the
    packed (hidden, cell) pairs of pi and vf that RecurrentPPO's buffer stores at every step."""
    env = TMazeVecEnv(8, corridor_length=20)
    elmur = ElmurPPO("ElmurPolicy", env, seed=0)
    recurrent = RecurrentPPO("ElmurPolicy", env, seed=0)
    packed = recurrent.rollout_buffer
    packed_bytes = sum(getattr(packed, name).nbytes for name in ("hidden_states_pi", "cell_states_pi",
                                                                 "hidden_states_vf", "cell_states_vf"))
    steps = recurrent.n_steps * env.num_envs
    ours = elmur.rollout_buffer.state_nbytes() / steps
    assert packed_bytes / steps > 2_500  # 356 floats per copy, 2 copies
    assert ours <= packed_bytes / steps / 10, (ours, packed_bytes / steps)


def test_learn_save_load_predict_and_cross_load(tmp_path):
    env = TMazeVecEnv(2, corridor_length=6, variant="passive", seed=0)
    model = ElmurPPO("ElmurPolicy", env, n_steps=16, batch_size=16, n_epochs=1, policy_kwargs=SMALL, seed=0,
                     tensorboard_log=str(tmp_path / "tb"))
    model.learn(64, progress_bar=True)
    assert model.num_timesteps == 64 and list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    model.save(tmp_path / "elmur_ppo")
    obs = np.random.default_rng(0).uniform(-1, 1, (2, 4)).astype(np.float32)
    actions, _ = model.predict(obs, deterministic=True)
    for cls in (ElmurPPO, RecurrentPPO):  # either algorithm reads the zip
        loaded = cls.load(tmp_path / "elmur_ppo", env=env)
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    RecurrentPPO.load(tmp_path / "elmur_ppo", env=env).save(tmp_path / "recurrent_ppo")
    loaded = ElmurPPO.load(tmp_path / "recurrent_ppo", env=env)
    assert (loaded.sequence_length, loaded.memory_horizon) == (16, 16)  # the defaults: n_steps, saved resolved
    loaded.learn(32)  # and trains on
    mean_reward, _ = evaluate_policy(loaded, env, n_eval_episodes=2)
    assert np.isfinite(mean_reward)
    script = f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        import sb3_elmur
        from sb3_elmur import ElmurPPO
        obs = np.random.default_rng(0).uniform(-1, 1, (2, 4)).astype(np.float32)
        print(ElmurPPO.load({str(tmp_path / 'elmur_ppo')!r}).predict(obs, deterministic=True)[0].tolist())
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(actions.tolist())


def test_bad_configurations_are_named():
    env = TMazeVecEnv(2, corridor_length=6)
    with pytest.raises(ValueError, match="unknown|not found|MlpLstmPolicy"):
        ElmurPPO("MlpLstmPolicy", env)
    with pytest.raises(ValueError, match="shared_backbone=True"):
        ElmurPPO("ElmurPolicy", env, policy_kwargs=dict(shared_backbone=False))
    with pytest.raises(ValueError, match="sequence_length must be"):
        ElmurPPO("ElmurPolicy", env, sequence_length=0)
    with pytest.raises(ValueError, match="memory_horizon must be"):
        ElmurPPO("ElmurPolicy", env, memory_horizon=-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_grad_norm=-1.0), r"max_grad_norm must be > 0 \(the largest gradient norm kept\), got -1.0"),
    (dict(max_grad_norm=0.0), r"max_grad_norm must be > 0 .*got 0.0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number, got nan"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(compile_acting="yes"), "compile_acting must be True or False, got 'yes'"),
    (dict(policy_kwargs=dict(detach_critic="False")), "detach_critic must be True or False, got 'False'"),
    (dict(policy_kwargs=dict(freeze_backbone="yes")), "freeze_backbone must be True or False, got 'yes'"),
    (dict(policy_kwargs=dict(shared_backbone="False")), "shared_backbone must be True or False, got 'False'"),
])
def test_silently_wrong_arguments_are_refused(kwargs, message):
    """A negative max_grad_norm climbed the loss, 0 stopped learning, batch_size=0 ran one sequence per minibatch and
    the strings counted as True: each is now an error that names it."""
    with pytest.raises(ValueError, match=message):
        ElmurPPO("ElmurPolicy", TMazeVecEnv(2, corridor_length=6), **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_matches_training_on_cuda():
    """On a GPU the buffer, the states and the fused attention stay on the device."""
    model = _model(device="cuda")
    _assert_rollouts_match_training(model, rollouts=2)
    buffer = model.rollout_buffer
    assert buffer.observations.is_cuda and buffer.anchor_memory.is_cuda and model._actor.state.memory.is_cuda


def test_compiled_acting_matches_training():
    """``compile_acting=True``: rollouts act through the compiled step, and training still recomputes the same
    log-probs and values."""
    model = _model(compile_acting=True, n_envs=2)
    assert model._actor.compiled is not None
    _assert_rollouts_match_training(model, rollouts=2)


def test_a_rollout_remainder_makes_no_one_step_minibatch():
    """n_steps=33 in sequences of 32: the rollout is cut into 17 + 16 steps per env, not 32 + 1 (a one-step
    minibatch has no advantage std: its normalization gave NaN and the update stopped with NonFiniteError)."""
    model = _model(n_envs=1, n_steps=33, sequence_length=32, batch_size=32, memory_horizon=0)
    model.learn(2 * 33)
    table = model.rollout_buffer.sequences()
    assert sorted((table["end"] - table["first"]).tolist()) == [16, 17]


def test_default_sequences_are_whole_rollouts_with_a_rollout_of_horizon():
    """The defaults (sequence_length and memory_horizon None): one sequence per env and rollout and a horizon of
    n_steps, which keep rollout == training (the configuration a user gets without setting them)."""
    model = _model(sequence_length=None, memory_horizon=None, batch_size=30)
    assert (model.sequence_length, model.memory_horizon) == (30, 30)
    _assert_rollouts_match_training(model)
