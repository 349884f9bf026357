import copy
import json
import subprocess
import warnings
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import NonFiniteLossError, RecurrentBC
from sb3_elmur.bc.collect import collect_episodes, make_tmaze_dataset
from sb3_elmur.bc.datasets import Episode, EpisodeDataset
from sb3_elmur.envs import TMazeOracle
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze
from sb3_elmur.common.utils import load_algorithm
from tests.dummy_envs import RandomLengthEnv

torch.set_num_threads(1)

SMALL_ELMUR = dict(d_model=16, n_layers=1, n_heads=2, memory_size=2, context_length=4)
PAPER_TMAZE = dict(d_model=32, n_layers=1, n_heads=2, memory_size=2, context_length=10)


@pytest.fixture(autouse=True)
def minari_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))


@pytest.fixture(scope="module")
def tmaze_dataset():
    return make_tmaze_dataset(2000, seed=0)


def _tmaze_env():
    return gym.make("sb3_elmur/TMaze-v0")


def test_tmaze_dataset_follows_the_reference_protocol(tmaze_dataset):
    lengths = np.array([len(ep) for ep in tmaze_dataset.episodes])
    assert len(tmaze_dataset) == 2000 and lengths.min() == 2 and lengths.max() == 29  # L + 1 steps, L in 1..28
    cues = np.array([ep.observations[0, 1] for ep in tmaze_dataset.episodes])
    assert (cues == 1).sum() == (cues == -1).sum() == 1000
    for ep in tmaze_dataset.episodes[:50]:
        assert ep.rewards[-1] == 1.0 and (ep.actions[:-1] == 0).all()
        assert ep.actions[-1] == (1 if ep.observations[0, 1] > 0 else 3)


def test_windows_start_at_segment_boundaries_as_early_as_possible():
    # actions: the episode's length at its last step, zeros before
    episodes = [Episode(np.arange(n, dtype=np.float32)[:, None], (np.arange(n) == n - 1) * n) for n in (3, 12, 40)]
    dataset = EpisodeDataset(episodes)
    obs, actions, mask, prefixes, prefix_segments, final = dataset.sample_windows(np.random.default_rng(0), 300, 12, 4)
    # whatever part of the episode a window covers, it comes with the action its episode ends with
    last = actions[np.arange(300), mask.sum(axis=1).astype(int) - 1]
    reaches_end = last > 0
    np.testing.assert_array_equal(final[reaches_end], last[reaches_end])
    assert (~reaches_end).any() and (final[~reaches_end] == 40).all() and set(final) == {3, 12, 40}
    # each window comes with its episode's steps before it (for the burn-in), left-aligned
    np.testing.assert_array_equal(prefix_segments * 4, obs[:, 0, 0])
    for row, start in zip(prefixes, obs[:, 0, 0].astype(int)):
        np.testing.assert_array_equal(row[:start, 0], np.arange(start))
        np.testing.assert_array_equal(row[start:], 0.0)
    assert obs.shape == (300, 12, 1) and actions.shape == (300, 12) and mask.shape == (300, 12)
    first = obs[:, 0, 0]
    lengths = mask.sum(axis=1)
    assert set(first[lengths == 3]) == {0.0} and set(first[lengths < 12]) == {0.0}
    # The 40-step episode: windows of 12 starting at 0, 4, ..., 28.
    assert set(first[obs[:, -1, 0] >= 11]) <= {0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0}
    assert len(set(first)) > 3
    np.testing.assert_array_equal(obs[lengths == 3][:, 3:], 0.0)


@pytest.mark.parametrize("length, sections, segment", [(35, 3, 10), (130, 5, 20), (40, 3, 4), (7, 2, 4)])
def test_every_step_of_an_episode_is_a_target_even_past_the_last_whole_window(length, sections, segment):
    """An episode whose length leaves a remainder after the last full window (35 steps, windows of 30; 130 steps,
    windows of 5 x 20) is still sampled to its end, from windows that start at segment boundaries."""
    window = sections * segment
    observations = np.arange(length, dtype=np.float32)[:, None]  # each step's index
    dataset = EpisodeDataset([Episode(observations, np.zeros(length, dtype=np.int64))])
    windows = dataset.sample_windows(np.random.default_rng(0), 400, window, segment)
    targets = windows.observations[..., 0][windows.mask > 0]
    assert set(targets.astype(int)) == set(range(length))
    starts = windows.observations[:, 0, 0].astype(int)
    assert (starts % segment == 0).all()
    np.testing.assert_array_equal(windows.prefix_segments * segment, starts)
    # the last start is the first boundary whose window reaches the end: no window is only padding past it
    assert starts.max() == max(0, -(-(length - window) // segment) * segment)
    assert (windows.mask.sum(axis=1) == np.minimum(window, length - starts)).all()


@pytest.mark.parametrize("detach", [False, True])
def test_burn_in_runs_without_dropout_as_acting_does(detach):
    """With dropout, the burn-in in training mode reaches the state acting (evaluation mode) reaches, every time,
    and leaves the policy in the mode it was in (whole windows at once, and section by section)."""
    dataset = make_tmaze_dataset(30, min_corridor=12, max_corridor=20, seed=3)
    kwargs = dict(SMALL_ELMUR, dropout=0.5, attn_dropout=0.5, memory_dropout=0.5)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=kwargs, sections=2, context_length=4,
                        detach_between_sections=detach, seed=0)
    windows = dataset.sample_windows(np.random.default_rng(2), 16, 8, 4)
    assert windows.prefix_segments.max() >= 2
    model.policy.set_training_mode(False)
    acting = model._burn_in_state(windows.prefixes, windows.prefix_segments)
    model.policy.set_training_mode(True)
    for _ in range(2):
        training = model._burn_in_state(windows.prefixes, windows.prefix_segments)
        for expected, got in zip(acting, training):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert model.policy.training


def test_dataset_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        EpisodeDataset([])
    with pytest.raises(ValueError, match="no steps"):
        EpisodeDataset([{"observations": np.zeros((1, 4)), "actions": np.zeros(0)}])
    with pytest.raises(ValueError, match="observations for"):
        EpisodeDataset([{"observations": np.zeros((5, 4)), "actions": np.zeros(2)}])
    wrong_obs = EpisodeDataset([{"observations": np.zeros((3, 7), dtype=np.float32), "actions": np.zeros(3, dtype=np.int64)}])
    with pytest.raises(ValueError, match="observation space"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), wrong_obs, policy_kwargs=SMALL_ELMUR)
    wrong_act = EpisodeDataset([{"observations": np.zeros((3, 4), dtype=np.float32), "actions": np.full(3, 9)}])
    with pytest.raises(ValueError, match="action space"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), wrong_act, policy_kwargs=SMALL_ELMUR)
    with pytest.raises(ValueError, match="needs a dataset"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), policy_kwargs=SMALL_ELMUR).learn(1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(sections=2.5), "sections must be a positive integer, got 2.5"),
    (dict(context_length=True), "context_length must be a positive integer, got True"),
    (dict(final_action_coef=-1.0), "final_action_coef must be >= 0, got -1.0"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm must be > 0 \(the largest gradient norm kept\), got -1.0"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
    (dict(label_smoothing=-0.5), r"label_smoothing must be in \[0, 1\), got -0.5"),
    (dict(label_smoothing=2.0), r"label_smoothing must be in \[0, 1\), got 2.0"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be a finite number, got nan"),
    (dict(burn_in="no"), "burn_in must be True or False, got 'no'"),
    (dict(detach_between_sections="False"), "detach_between_sections must be True or False, got 'False'"),
    (dict(policy_kwargs=dict(SMALL_ELMUR, shared_backbone="False")), "shared_backbone must be True or False"),
])
def test_bad_sizes_are_named(kwargs, message):
    kwargs = {"policy_kwargs": SMALL_ELMUR, **kwargs}
    with pytest.raises(ValueError, match=message):
        RecurrentBC("ElmurPolicy", _tmaze_env(), **kwargs)


def test_minari_roundtrip_and_dataset_id(tmp_path):
    dataset = make_tmaze_dataset(20, seed=1)
    dataset.to_minari("tmaze/oracle-test-v0", env=_tmaze_env())
    loaded = EpisodeDataset.from_minari("tmaze/oracle-test-v0")
    assert len(loaded) == 20
    for a, b in zip(dataset.episodes, loaded.episodes):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), "tmaze/oracle-test-v0", policy_kwargs=SMALL_ELMUR, batch_size=4)
    assert len(model.dataset) == 20
    model.learn(2)


@pytest.mark.parametrize("policy, kwargs", [("ElmurPolicy", SMALL_ELMUR), ("MlpLstmPolicy", dict(lstm_hidden_size=8))])
def test_training_windows_compute_what_the_policy_computes_step_by_step(policy, kwargs):
    """The section-by-section training pass equals acting step by step with predict's state."""
    dataset = make_tmaze_dataset(30, max_corridor=20, seed=2)
    model = RecurrentBC(policy, _tmaze_env(), dataset, policy_kwargs=kwargs, sections=3, context_length=4, seed=0)
    obs, _, mask, _, _, _ = dataset.sample_windows(np.random.default_rng(1), 5, 12, 4)
    with torch.no_grad():
        windows = model._window_distributions(obs)
        window_logits = torch.cat([d.distribution.logits.view(5, -1, d.distribution.logits.shape[-1]).clone()
                                   for _, _, d in windows], dim=1)  # [B, 12, A]
    state = None
    for t in range(12):
        obs_t = torch.as_tensor(obs[:, t])
        packed = tuple(torch.zeros(model.policy.lstm_hidden_state_shape[0], 5, model.policy.lstm_hidden_state_shape[2])
                       for _ in range(2)) if state is None else state
        with torch.no_grad():
            dist, state = model.policy.get_distribution(obs_t, packed, torch.zeros(5))
        real = mask[:, t] > 0
        torch.testing.assert_close(dist.distribution.logits[real], window_logits[real, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy, kwargs", [("ElmurPolicy", SMALL_ELMUR), ("MlpLstmPolicy", dict(lstm_hidden_size=8))])
def test_a_window_starts_from_the_memory_of_acting_through_its_episode(policy, kwargs):
    """Burn-in: the state a mid-episode window starts from equals the state of acting step by step through the
    episode up to the window (and with burn_in=False, a fresh episode's)."""
    dataset = make_tmaze_dataset(30, min_corridor=12, max_corridor=20, seed=3)
    model = RecurrentBC(policy, _tmaze_env(), dataset, policy_kwargs=kwargs, sections=2, context_length=4, seed=0)
    windows = dataset.sample_windows(np.random.default_rng(2), 16, 8, 4)
    assert windows.prefix_segments.min() == 0 and windows.prefix_segments.max() >= 2  # fresh and deep windows
    with torch.no_grad():
        burnt_in = model._burn_in_state(windows.prefixes, windows.prefix_segments)
    shape = model.policy.lstm_hidden_state_shape
    for row, segments in enumerate(windows.prefix_segments):
        state = tuple(torch.zeros(shape[0], 1, shape[2]) for _ in range(2))
        for t in range(4 * int(segments)):
            with torch.no_grad():
                _, state = model.policy.get_distribution(torch.as_tensor(windows.prefixes[row : row + 1, t]), state,
                                                         torch.zeros(1))
        for acted, trained in zip(state, burnt_in):
            torch.testing.assert_close(trained[:, row : row + 1], acted, atol=1e-5, rtol=0)
    model.burn_in = False
    assert all((part == 0).all() for part in model._burn_in_state(windows.prefixes, windows.prefix_segments))


def test_bc_elmur_solves_tmaze_at_corridor_100(tmaze_dataset):
    """The short reproduction: trained on <= 29-step episodes, right at corridor 100 (10 segments). One evaluation
    after a fixed budget, on observation noise the dataset (seed 0) never had: 750 gradient steps sit in the middle
    of seed 0's plateau (chance, 0.45-0.49, at 250 steps; 1.00 from 500 to 1,250 on evaluation seeds 0 and 1000)."""
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), tmaze_dataset, policy_kwargs=PAPER_TMAZE, learning_rate=1e-3, seed=0)
    model.learn(750)
    success = evaluate_tmaze(model, 100, n_episodes=100, variant="reference", seed=1000)
    assert success >= 0.95, f"{success:.2f} after {model.num_timesteps} gradient steps"


def test_save_load_callbacks_progress_bar_and_finetuning(tmp_path):
    dataset = make_tmaze_dataset(40, max_corridor=12, seed=3)

    class Counter(BaseCallback):
        def _on_step(self) -> bool:
            self.calls = getattr(self, "calls", 0) + 1
            return True

    counter = Counter()
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=SMALL_ELMUR, batch_size=8,
                        tensorboard_log=str(tmp_path / "tb"), label_smoothing=0.1)
    model.learn(12, callback=counter, progress_bar=True, log_interval=4)
    assert counter.calls == 12 and model.num_timesteps == 12
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    obs = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)
    actions, state = model.predict(obs, deterministic=True)
    model.save(tmp_path / "bc")
    loaded = RecurrentBC.load(tmp_path / "bc")
    again, state_again = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, again)
    np.testing.assert_array_equal(state[0], state_again[0])
    ppo = model.to_recurrent_ppo(_tmaze_env(), n_steps=16, batch_size=16)
    assert isinstance(ppo, RecurrentPPO)
    np.testing.assert_array_equal(ppo.predict(obs, deterministic=True)[0], actions)
    ppo.learn(32)


@pytest.mark.parametrize("loss", ["mse", "nll"])
def test_continuous_actions_collected_from_a_policy(loss):
    env = RandomLengthEnv(spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), min_len=5, max_len=12)

    class Scripted:  # acts on the observation: a memoryless expert is enough to test the loss
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.clip(obs[:, :2], -1, 1), state

    dataset = collect_episodes(Scripted(), env, n_episodes=30)
    assert len(dataset) == 30 and dataset.episodes[0].actions.shape[1:] == (2,)
    model = RecurrentBC("ElmurPolicy", env, dataset, policy_kwargs=SMALL_ELMUR, continuous_loss=loss, batch_size=16,
                        learning_rate=3e-3, seed=0)
    windows = dataset.sample_windows(np.random.default_rng(0), 64, 12, 4)
    with torch.no_grad():
        before = model._window_loss(windows)[0].item()
    model.learn(150)
    with torch.no_grad():
        after = model._window_loss(windows)[0].item()
    assert after < before - 0.1 * abs(before), (before, after)


def test_collect_episodes_records_a_recurrent_policy():
    env = gym.make("sb3_elmur/TMaze-v0", corridor_length=5)
    dataset = collect_episodes(TMazeOracle(1), env, n_episodes=6, seed=0)
    assert all(len(ep) == 6 for ep in dataset.episodes)
    assert all(ep.rewards[-1] == 1.0 for ep in dataset.episodes)


def test_command_line_tools(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path / "minari"), "PATH": ""}
    import os

    env = {**os.environ, **{k: v for k, v in env.items() if k != "PATH"}}
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    result = run("sb3_elmur.datasets", "tmaze", "--dataset-id", "tmaze/cli-v0", "--episodes", "30")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no runpy RuntimeWarning, no Minari metadata reminders
    assert f"wrote tmaze/cli-v0 to {tmp_path / 'minari' / 'tmaze' / 'cli-v0'}: 30 episodes" in result.stdout
    result = run("sb3_elmur.datasets", "tmaze", "--dataset-id", "tmaze/cli-v0", "--episodes", "1000000")
    assert result.returncode == 2 and "tmaze/cli-v0' already exists at" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("sb3_elmur.datasets", "tmaze", "--dataset-id", "tmaze/cli-v0", "--episodes", "20", "--overwrite")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "replaced the Minari dataset tmaze/cli-v0" in result.stdout and "20 episodes" in result.stdout
    assert len(EpisodeDataset.from_minari("tmaze/cli-v0")) == 20
    # 50 gradient steps on short corridors: it walks to the junction and turns (success 0.5, not an untrained 0.0)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), make_tmaze_dataset(30, max_corridor=8, seed=0),
                        policy_kwargs=SMALL_ELMUR, learning_rate=3e-3, batch_size=16, seed=0).learn(50)
    model.save(tmp_path / "bc")
    out = tmp_path / "eval.json"
    # The default --algo RecurrentPPO reads a RecurrentBC zip.
    result = run("sb3_elmur.tmaze_eval", str(tmp_path / "bc.zip"), "--corridors", "5", "50",
                 "--episodes", "10", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["corridor"] for r in rows] == [5, 50]
    # what it writes is the success of that model on those episodes (its --seed 0), as evaluate_tmaze measures it
    expected = [evaluate_tmaze(model, corridor, n_episodes=10, variant="reference", seed=0) for corridor in (5, 50)]
    assert [r["success"] for r in rows] == expected and min(expected) > 0.0
    assert "| 50 |" in result.stdout
    result = run("sb3_elmur.datasets", "collect", "--algo", "RecurrentBC", "--model", str(tmp_path / "bc.zip"),
                 "--env", "sb3_elmur/TMaze-v0", "--env-kwargs", '{"corridor_length": 4}', "--episodes", "3",
                 "--dataset-id", "tmaze/collected-v0")
    assert result.returncode == 0, result.stderr
    assert len(EpisodeDataset.from_minari("tmaze/collected-v0")) == 3


@pytest.mark.parametrize("dataset", [np.zeros((3, 4)), {"observations": np.zeros((3, 4)), "actions": np.zeros(3)}, 7])
def test_a_dataset_of_the_wrong_type_is_a_type_error(dataset):
    with pytest.raises(TypeError, match="RecurrentBC's dataset is an EpisodeDataset, a list of episodes"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=SMALL_ELMUR)


def test_whole_episodes_are_checked_not_only_their_first_step():
    episodes = [{"observations": np.zeros((6, 4), dtype=np.float32), "actions": np.zeros(6, dtype=np.int64)} for _ in range(3)]
    episodes[2]["actions"][3] = 9
    with pytest.raises(ValueError, match=r"episode 2, step 3: action 9 is outside 0..3"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), episodes, policy_kwargs=SMALL_ELMUR)
    episodes[2]["actions"] = np.array([0, 0, 0.7, 0, 0, 1])
    with pytest.raises(ValueError, match=r"episode 2, step 2: action 0.7 is not a whole number"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), episodes, policy_kwargs=SMALL_ELMUR)
    episodes[2]["actions"] = np.zeros(6, dtype=np.int64)
    episodes[1]["observations"][4, 2] = np.nan
    with pytest.raises(ValueError, match=r"episode 1, step 4: observation .* is not finite"):
        RecurrentBC("ElmurPolicy", _tmaze_env(), episodes, policy_kwargs=SMALL_ELMUR)


def test_save_load_keeps_the_optimizer_and_cross_loads_with_recurrent_ppo(tmp_path, monkeypatch):
    dataset = make_tmaze_dataset(10, max_corridor=6, seed=4)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=SMALL_ELMUR, batch_size=4, seed=0)
    model.learn(3)
    model.save(tmp_path / "bc")
    loaded = RecurrentBC.load(tmp_path / "bc")
    saved_state, loaded_state = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert saved_state["state"] and saved_state["state"].keys() == loaded_state["state"].keys()
    for key, state in saved_state["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(loaded_state["state"][key][name], value, rtol=0, atol=0)
    obs = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)
    actions = model.predict(obs, deterministic=True)[0]
    # A RecurrentBC zip is a RecurrentPPO zip, and the other way round.
    for ppo in (RecurrentPPO.load(tmp_path / "bc"), load_algorithm("RecurrentPPO", tmp_path / "bc")):
        assert isinstance(ppo, RecurrentPPO)
        np.testing.assert_array_equal(ppo.predict(obs, deterministic=True)[0], actions)
    ppo = RecurrentPPO("ElmurPolicy", _tmaze_env(), policy_kwargs=SMALL_ELMUR, seed=1)
    ppo.save(tmp_path / "ppo")
    from_ppo = RecurrentBC.load(tmp_path / "ppo", env=_tmaze_env())
    np.testing.assert_array_equal(from_ppo.predict(obs, deterministic=True)[0], ppo.predict(obs, deterministic=True)[0])
    from_ppo.set_dataset(dataset)
    from_ppo.learn(1)

    # A zip of sb3-elmur 0.1.0 holds no optimizer state.
    monkeypatch.setattr(RecurrentBC, "_get_torch_save_params", lambda self: (["policy"], []))
    model.save(tmp_path / "old")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="saved without its optimizer state .* starts afresh"):
        old = RecurrentBC.load(tmp_path / "old")
    np.testing.assert_array_equal(old.predict(obs, deterministic=True)[0], actions)
    assert not old.policy.optimizer.state_dict()["state"]
    with pytest.raises(ValueError, match=r"holds a RecurrentBC model saved without its optimizer state .* RecurrentBC.load \(command line: --algo RecurrentBC\)"):
        load_algorithm("RecurrentPPO", tmp_path / "old")


def _final_action_predictions(model: RecurrentBC, observations: np.ndarray) -> torch.Tensor:
    """The final-action head's logits [B, T, A] over windows [B, T, ...] that start their episodes, computed apart
    from RecurrentBC's training code: the backbone over whole windows, the actor's MLP, the head."""
    policy = model.policy
    n, t = observations.shape[:2]
    starts = torch.zeros(n, t, dtype=torch.bool)
    starts[:, 0] = True
    with torch.no_grad():
        out, _ = policy.backbone_sequences(torch.as_tensor(observations).flatten(0, 1),
                                           policy.lstm_actor.model.initial_state(n), starts)
        latent_pi, _ = policy._heads(out.reshape(n * t, -1))
        return model.final_action_head(latent_pi).view(n, t, -1)


def test_final_action_head_predicts_the_final_action_at_every_step():
    """The auxiliary head learns to name, at every step, the action its episode ends with: on T-Maze episodes of
    2-4 steps (one segment of 4, so the cue of step 0 is in reach of self-attention), the turn the cue asks for.
    Before training it is right on 4% of the steps, chance is 50% (up or down); after 100 gradient steps every
    step. Its logged accuracy and loss are those of the batch it trained on, computed here apart."""
    dataset = make_tmaze_dataset(40, min_corridor=1, max_corridor=3, seed=0)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=SMALL_ELMUR, batch_size=16, sections=1,
                        final_action_coef=1.0, learning_rate=3e-3, seed=0)
    model.learn(100)
    model.policy.set_training_mode(False)
    right = total = 0
    for episode in dataset.episodes:
        steps = len(episode.actions)
        logits = _final_action_predictions(model, episode.observations[None, :steps])[0]
        right += int((logits.argmax(-1).numpy() == episode.actions[-1]).sum())
        total += steps
    assert right / total >= 0.95, f"the head names the final action at {right} of {total} steps"

    # The metrics of the next gradient step: on the windows it samples (from the same generator state).
    windows = dataset.sample_windows(copy.deepcopy(model._rng), 16, 4, 4)
    assert windows.prefix_segments.max() == 0  # whole episodes: no burn-in
    logits = _final_action_predictions(model, windows.observations)
    targets = torch.as_tensor(windows.final_actions).long().view(-1, 1).expand(logits.shape[:2])
    mask = torch.as_tensor(windows.mask, dtype=torch.float32)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    expected_loss = float((losses * mask.flatten()).sum() / mask.sum())
    expected_accuracy = float(((logits.argmax(-1) == targets).float() * mask).sum() / mask.sum())
    metrics = model.train()
    assert metrics["final_action_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
    assert metrics["final_action_loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)


def test_final_action_head_trains_saves_and_stays_out_of_acting(tmp_path):
    from sb3_elmur.bc.collect import make_recall_dataset
    from sb3_elmur.envs import NoisyRecallEnv

    dataset = make_recall_dataset(40, length=(5, 20), wait=True, seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=True), dataset, policy_kwargs=SMALL_ELMUR, batch_size=8,
                        sections=5, final_action_coef=0.5, seed=0)
    initial = [p.detach().clone() for p in model.final_action_head.parameters()]
    model.learn(2)
    # trained through an optimizer of its own, so that the policy's stays the policy's alone
    assert all(not torch.equal(p, q) for p, q in zip(model.final_action_head.parameters(), initial))
    assert len(model.policy.optimizer.param_groups) == 1 and model.final_action_optimizer.state_dict()["state"]
    model.save(tmp_path / "bc")
    loaded = RecurrentBC.load(tmp_path / "bc", env=NoisyRecallEnv(wait=True))
    for p, q in zip(model.final_action_head.parameters(), loaded.final_action_head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved, restored = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert saved["state"].keys() == restored["state"].keys() and len(restored["param_groups"]) == 1
    loaded.set_dataset(dataset)
    loaded.learn(1)
    # Acting needs no head: the policy alone goes to RecurrentPPO, and RecurrentPPO.load reads the zip without it
    # (tests/test_bad_input_round2.py).
    obs = np.stack([dataset.episodes[0].observations[0]] * 2)
    ppo = model.to_recurrent_ppo(NoisyRecallEnv(wait=True))
    np.testing.assert_array_equal(ppo.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    np.testing.assert_array_equal(load_algorithm("RecurrentPPO", tmp_path / "bc").predict(obs, deterministic=True)[0],
                                  model.predict(obs, deterministic=True)[0])
    with pytest.raises(ValueError, match="final_action_coef needs a Discrete action space"):
        RecurrentBC("MlpLstmPolicy", "Pendulum-v1", final_action_coef=1.0)


@pytest.mark.parametrize(
    "bias, error",
    [(3e38, "the loss is inf at gradient step 2"), (float("inf"), "the action distribution's parameters are NaN or inf at gradient step 2")],
)
@pytest.mark.parametrize("policy, kwargs", [("ElmurPolicy", SMALL_ELMUR), ("MlpLstmPolicy", dict(lstm_hidden_size=8))])
def test_a_non_finite_loss_stops_training_before_the_update(policy, kwargs, bias, error, monkeypatch):
    # torch.compile (any earlier test that compiles acting) turns torch's distribution argument checks off for the
    # whole process; the inf case is then caught one step later, as "the loss is nan". Pin the default here.
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    dataset = make_tmaze_dataset(10, max_corridor=6, seed=5)
    model = RecurrentBC(policy, _tmaze_env(), dataset, policy_kwargs=kwargs, batch_size=4, seed=0)
    model.learn(2)
    with torch.no_grad():
        model.policy.action_net.bias[0] = bias  # diverged: an overflowing loss, or logits no distribution takes
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    adam_before = {k: {n: v.clone() for n, v in s.items()} for k, s in model.policy.optimizer.state_dict()["state"].items()}
    with pytest.raises(NonFiniteLossError, match=f"{error}; the parameters were not updated"):
        model.learn(1)
    for key, value in model.policy.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    for key, state in model.policy.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, adam_before[key][name], rtol=0, atol=0)


def test_a_dataset_that_never_overwrites_a_slot_twice_gets_a_warning():
    """2 slots, segments of 10: T-Maze episodes of at most 29 steps complete 2 or 3 segments (no slot is overwritten twice),
    noisy recall episodes of 60 complete 6 (each slot overwritten twice or more)."""
    from sb3_elmur.bc.collect import make_recall_dataset
    from sb3_elmur.envs import NoisyRecallEnv

    model = RecurrentBC("ElmurPolicy", _tmaze_env(), make_tmaze_dataset(20, seed=0), batch_size=2,
                        policy_kwargs=PAPER_TMAZE)
    with pytest.warns(UserWarning, match=r"longest training episode has \d+ steps: [23] memory writes .* into 2 slots"):
        model.learn(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(1)  # once per dataset
        long_episodes = RecurrentBC("ElmurPolicy", NoisyRecallEnv(length=60), make_recall_dataset(4, length=60),
                                    batch_size=2, policy_kwargs=PAPER_TMAZE)
        long_episodes.learn(1)
        RecurrentBC("MlpLstmPolicy", _tmaze_env(), make_tmaze_dataset(20, seed=0), batch_size=2).learn(1)  # no slots


def test_elmur_windows_in_one_call_equal_the_section_loop():
    """ELMUR's whole-window pass (and one-call burn-in) computes what the section loop computes; detach_between_sections
    takes the loop, and only cuts gradients."""
    dataset = make_tmaze_dataset(30, min_corridor=12, max_corridor=20, seed=4)
    model = RecurrentBC("ElmurPolicy", _tmaze_env(), dataset, policy_kwargs=SMALL_ELMUR, sections=2, context_length=4,
                        batch_size=8, seed=0)
    windows = dataset.sample_windows(np.random.default_rng(3), 8, 8, 4)
    assert windows.prefix_segments.min() == 0 and windows.prefix_segments.max() >= 1  # fresh and mid-episode windows
    results = {}
    for detach in (False, True):
        model.detach_between_sections = detach
        with torch.no_grad():
            state = model._burn_in_state(windows.prefixes, windows.prefix_segments)
            parts = [d.distribution.logits.view(8, -1, 4).clone()
                     for _, _, d in model._window_distributions(windows.observations, state)]
        assert len(parts) == (2 if detach else 1)
        results[detach] = (state, torch.cat(parts, dim=1))
    for whole, looped in zip(results[False][0], results[True][0]):
        torch.testing.assert_close(whole, looped, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[False][1], results[True][1], atol=1e-5, rtol=0)
    model.learn(2)  # the section loop trains too
