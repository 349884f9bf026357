"""ElmurTensorboardCallback: memory statistics by hand, and the scalars it writes to TensorBoard during learn()."""

import math
from pathlib import Path
from typing import List

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.env_util import make_vec_env

import sb3_elmur  # noqa: F401  (registers the policy names and T-Maze ids)
from sb3_elmur import ElmurPPO
from sb3_elmur.common.callbacks import AttentionRecorder, ElmurTensorboardCallback, memory_stats
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.model import ElmurModel

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4)


def _tmaze_model(
    corridor_length: int, tensorboard_log=None, policy="ElmurPolicy", algo=RecurrentPPO, **policy_kwargs
) -> RecurrentPPO:
    # A callable, not the id: make_vec_env would pass render_mode="rgb_array", which TMazeEnv rejects.
    env = make_vec_env(lambda: gym.make("sb3_elmur/PassiveTMaze-v0", corridor_length=corridor_length), n_envs=4, seed=0)
    kwargs = {**SMALL, **policy_kwargs} if policy == "ElmurPolicy" else policy_kwargs
    return algo(
        policy, env, n_steps=32, batch_size=64, n_epochs=1, seed=0, tensorboard_log=tensorboard_log, policy_kwargs=kwargs
    )


def _scalars(log_dir: Path) -> dict:
    (run_dir,) = [d for d in Path(log_dir).iterdir() if d.is_dir()]
    accumulator = event_accumulator.EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_memory_stats_by_hand():
    # Row 0: layer 0 has slots written at steps 3 and 7, one empty; layer 1 one slot at step 7. Row 1: all empty.
    memory = torch.zeros(2, 2, 3, 2)
    memory[0, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    memory[0, 0, 2] = torch.tensor([0.0, 2.0])  # norm 2
    memory[0, 1, 1] = torch.tensor([1.0, 0.0])  # norm 1
    memory[1] = 9.0  # never written: must not count
    positions = torch.tensor([[[3, -1, 7], [-1, 7, -1]], [[-1, -1, -1], [-1, -1, -1]]])
    state = ElmurState(memory=memory, positions=positions, segment=torch.zeros(2, 3, 2), step=torch.tensor([10, 2]),
                       previous=torch.zeros(2, memory.shape[1], 0, 2))
    stats = memory_stats(state)
    # Newest token of row 0 is step 9: ages 9 - 3 = 6 and 9 - 7 = 2 (layer 0), 2 (layer 1).
    np.testing.assert_allclose(stats["norm_sum"], [7.0, 1.0])
    np.testing.assert_allclose(stats["age_sum"], [8.0, 2.0])
    np.testing.assert_allclose(stats["written"], [2.0, 1.0])
    np.testing.assert_allclose(stats["slots"], [6.0, 6.0])


def _read_shares_step_by_step(model: ElmurModel, x: torch.Tensor, state: ElmurState, starts: torch.Tensor) -> List[float]:
    """The read share of each layer as acting computes it, step by step (``ElmurModel.step``): per token, the norms of
    the read's and the self-attention's outputs at that token's position, ``|read| / (|read| + |self|)``, averaged
    over the N x T tokens, each once. No grid, no mask of valid positions: the reference for AttentionRecorder."""
    k = model.config.context_length
    outputs: dict = {}
    handles = [module.register_forward_hook(lambda m, a, out, key=(i, name): outputs.__setitem__(key, out))
               for i, layer in enumerate(model.layers) for name, module in (("self", layer.self_attn), ("read", layer.read))]
    shares = [[] for _ in model.layers]
    steps = state.step.clone()
    rows = torch.arange(x.shape[0])
    try:
        with torch.no_grad():
            for t in range(x.shape[1]):
                steps = torch.where(starts[:, t], torch.zeros_like(steps), steps)
                offset = steps % k  # the new token's position in its segment
                outputs.clear()
                _, state = model(x[:, t : t + 1], state, starts[:, t : t + 1])
                for i in range(len(model.layers)):
                    # a layer computes the new position only ([N, 1, D]), or the whole segment ([N, K, D])
                    norms = [out.norm(dim=-1)[rows, 0 if out.shape[1] == 1 else offset]
                             for out in (outputs[i, "self"], outputs[i, "read"])]
                    shares[i].append(norms[1] / (norms[0] + norms[1]))
                steps = steps + 1
    finally:
        for handle in handles:
            handle.remove()
    return [float(torch.cat(layer_shares).mean()) for layer_shares in shares]


def test_attention_recorder_counts_real_tokens_only():
    model = ElmurModel(3, ElmurConfig(**SMALL))
    x = torch.randn(2, 10, 3)
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, 5] = True  # row 0: segments [0-3] [4] [5-8] [9]; row 1: [0-3] [4-7] [8-9] -> 4 segments of 4 positions
    recorder = AttentionRecorder(model)
    try:
        with torch.no_grad():
            model(x, model.initial_state(2), starts)
            model(x[:, :1], model.initial_state(2), starts[:, :1])  # one step: the acting path, not recorded
            model(x, model.initial_state(2), episode_starts=starts)
    finally:
        recorder.remove()
    # Per pass, 20 of the 32 grid positions hold the inputs; the memory read's norms line up with self-attention's.
    assert len(recorder.valid) == 2 and recorder.n_tokens == 40
    assert all(len(norms) == 2 and norms[0].shape == (32,) for norms in recorder.self_norms + recorder.read_norms)
    # Both passes saw the same tokens: their share is that of acting through those 20 tokens step by step.
    expected = _read_shares_step_by_step(model.eval(), x, model.initial_state(2), starts)
    np.testing.assert_allclose(recorder.read_shares(), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        model(x, model.initial_state(2), starts)
    assert recorder.n_tokens == 40  # removed hooks record nothing


@pytest.mark.parametrize("algo", [RecurrentPPO, ElmurPPO], ids=lambda cls: cls.__name__)
def test_learn_logs_memory_scalars_to_tensorboard(tmp_path, algo):
    corridor = 10  # episodes of 12 steps: segments of 4 complete, so memory gets written
    model = _tmaze_model(corridor, tensorboard_log=str(tmp_path), algo=algo)

    class Measured(ElmurTensorboardCallback):
        """Keeps every read share it measures (the measurement itself: the tests below)."""

        def __init__(self) -> None:
            super().__init__()
            self.shares: List[List[float]] = []

        def read_share_of_last_rollout(self):
            shares = super().read_share_of_last_rollout()
            self.shares.append(shares)
            return shares

    callback = Measured()
    model.learn(3 * 32 * 4, callback=callback)
    scalars = _scalars(tmp_path)
    expected = {"elmur/memory_norm", "elmur/slot_age", "elmur/written_slots", "elmur/memory_read_share"}
    expected |= {f"elmur/{name}_layer{i}" for name in ("memory_norm", "slot_age", "memory_read_share") for i in (0, 1)}
    assert expected <= set(scalars)
    for tag in expected:
        assert len(scalars[tag]) == 3 and all(math.isfinite(v) for v in scalars[tag]), tag
    assert all(v > 0 for v in scalars["elmur/memory_norm"])
    # A slot written at the end of segment s is read during segment s + 1: its age stays below 2 segments, and
    # the episode is 12 steps long.
    assert all(0 <= v < 2 * SMALL["context_length"] for v in scalars["elmur/slot_age"])
    assert all(0 < v < 1 for v in scalars["elmur/written_slots"])
    # The shares logged are those measured at the end of each rollout: per layer, and their mean.
    assert len(callback.shares) == 3
    for layer in (0, 1):
        np.testing.assert_allclose(scalars[f"elmur/memory_read_share_layer{layer}"], [s[layer] for s in callback.shares],
                                   rtol=1e-6)
    np.testing.assert_allclose(scalars["elmur/memory_read_share"], np.mean(callback.shares, axis=1), rtol=1e-6)


def test_nothing_but_the_written_fraction_before_the_first_write(tmp_path):
    model = _tmaze_model(corridor_length=1, tensorboard_log=str(tmp_path), context_length=8)  # 3-step episodes
    model.learn(32 * 4, callback=ElmurTensorboardCallback(attention_freq=0))
    scalars = _scalars(tmp_path)
    assert scalars["elmur/written_slots"] == [0.0]
    assert not any(tag.startswith(("elmur/memory_norm", "elmur/slot_age", "elmur/memory_read")) for tag in scalars)


def _collect_one_rollout(model: RecurrentPPO, callback: ElmurTensorboardCallback) -> None:
    _, callback_list = model._setup_learn(10_000, callback)
    callback_list.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback_list, model.rollout_buffer, model.n_steps)


def test_read_share_measures_the_memory_branch():
    model = _tmaze_model(corridor_length=10)
    callback = ElmurTensorboardCallback()
    _collect_one_rollout(model, callback)
    shares = callback.read_share_of_last_rollout()
    # The share of the rollout's 4 x 32 steps, as acting through them step by step measures it.
    buffer, policy = model.rollout_buffer, model.policy
    observations = torch.as_tensor(buffer.observations.swapaxes(0, 1))  # [n_envs, n_steps, obs]
    with torch.no_grad():
        features = policy.extract_features(observations.flatten(0, 1), policy.pi_features_extractor).view(4, 32, -1)
    state = policy.lstm_actor.unpack((torch.as_tensor(buffer.hidden_states_pi[0]), torch.as_tensor(buffer.cell_states_pi[0])))
    starts = torch.as_tensor(buffer.episode_starts.swapaxes(0, 1) > 0.5)
    assert starts[:, 1:].any()  # episodes end inside the rollout
    expected = _read_shares_step_by_step(policy.lstm_actor.model, features, state, starts)
    np.testing.assert_allclose(shares, expected, rtol=0, atol=1e-5)
    layers = model.policy.lstm_actor.model.layers
    with torch.no_grad():
        for layer in layers:  # the memory read adds nothing
            layer.read.proj.weight.zero_()
            layer.read.proj.bias.zero_()
    assert callback.read_share_of_last_rollout() == [0.0, 0.0]
    with torch.no_grad():
        layers[1].read.proj.bias.fill_(1.0)
        layers[1].self_attn.proj.weight.zero_()  # layer 1: only the memory read adds anything
        layers[1].self_attn.proj.bias.zero_()
    assert callback.read_share_of_last_rollout() == [0.0, 1.0]


def test_elmur_ppo_read_share_counts_each_rollout_step_once():
    """ElmurPPO's training sequences hold burn-in steps (``memory_horizon``) and padding besides the rollout's
    steps: the share is that of the rollout's steps, each once, as one pass over each env's rollout measures it."""
    env = make_vec_env(lambda: gym.make("sb3_elmur/PassiveTMaze-v0", corridor_length=10), n_envs=4, seed=0)
    model = ElmurPPO("ElmurPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0, sequence_length=8,
                     memory_horizon=8, policy_kwargs=SMALL)
    callback = ElmurTensorboardCallback()
    _collect_one_rollout(model, callback)
    shares = callback.read_share_of_last_rollout()
    # The first rollout starts from a fresh memory: one pass per env over its 32 steps is the reference.
    buffer, h = model.rollout_buffer, model.rollout_buffer.history_length
    assert buffer.history_filled == 0
    observations = buffer.observations[h : h + 32].transpose(0, 1).flatten(0, 1)
    starts = buffer.episode_starts[h : h + 32].transpose(0, 1)
    backbone = model.policy.lstm_actor.model
    recorder = AttentionRecorder(backbone)
    try:
        with torch.no_grad():
            model.policy.backbone_sequences(observations, backbone.initial_state(4), starts)
    finally:
        recorder.remove()
    assert recorder.n_tokens == 4 * 32
    np.testing.assert_allclose(shares, recorder.read_shares(), rtol=0, atol=1e-5)


def test_read_share_not_measured_without_memory_read():
    model = _tmaze_model(corridor_length=10, use_memory_read=False)
    callback = ElmurTensorboardCallback()
    _collect_one_rollout(model, callback)
    assert callback.read_share_of_last_rollout() is None


def test_callback_needs_an_elmur_policy():
    model = _tmaze_model(corridor_length=3, policy="MlpLstmPolicy")
    with pytest.raises(ValueError, match="needs a RecurrentPPO or ElmurPPO model with an ElmurPolicy"):
        model.learn(128, callback=ElmurTensorboardCallback())


@pytest.mark.parametrize("kwargs", [dict(sample_freq=0), dict(sample_freq=1.5), dict(attention_freq=-1)])
def test_callback_rejects_bad_frequencies(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ElmurTensorboardCallback(**kwargs)
