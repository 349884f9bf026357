import multiprocessing
import os
import re
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import sb3_elmur  # noqa: F401
import sb3_elmur.bc.datasets as datasets
from sb3_elmur.bc import minari
from sb3_elmur.bc.collect import make_tmaze_dataset
from sb3_elmur.bc.datasets import EpisodeDataset
from sb3_elmur.bc.minari import check_minari_id
from sb3_elmur.datasets.__main__ import main as datasets_main

torch.set_num_threads(1)

BOX4 = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)


@pytest.fixture(autouse=True)
def minari_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def _episodes(n_episodes=2, length=5, action=0):
    return [
        {"observations": np.zeros((length, 4), dtype=np.float32), "actions": np.full(length, action, dtype=np.int64)}
        for _ in range(n_episodes)
    ]


def _with(episodes, index, key, step, value):
    episodes[index][key] = episodes[index][key].astype(np.result_type(episodes[index][key], np.asarray(value)))
    episodes[index][key][step] = value
    return episodes


@pytest.mark.parametrize("value", [np.zeros((3, 4)), {"observations": np.zeros((3, 4)), "actions": np.zeros(3)}, "tmaze/oracle-v0", 5])
def test_a_dataset_of_the_wrong_type_says_what_is_accepted(value):
    with pytest.raises(TypeError, match="takes a list of episodes .* got a"):
        EpisodeDataset(value)


def test_malformed_episodes_are_named():
    with pytest.raises(TypeError, match="episode 1 is a ndarray"):
        EpisodeDataset([_episodes(1)[0], np.zeros(3)])
    with pytest.raises(ValueError, match="episode 0 has no 'actions'"):
        EpisodeDataset([{"observations": np.zeros((3, 4))}])
    with pytest.raises(ValueError, match="episode 0: actions are not a rectangular array"):
        EpisodeDataset([{"observations": np.zeros((2, 4)), "actions": [[0, 1], [2]]}])
    with pytest.raises(TypeError, match="episode 0: actions have dtype <U"):
        EpisodeDataset([{"observations": np.zeros((2, 4)), "actions": ["left", "right"]}])
    with pytest.raises(ValueError, match=r"episode 0: rewards have shape \(2,\), need \(3,\)"):
        EpisodeDataset([{"observations": np.zeros((3, 4)), "actions": np.zeros(3), "rewards": np.zeros(2)}])
    with pytest.raises(ValueError, match="episode 1 has per-step shapes"):
        EpisodeDataset([*_episodes(1), {"observations": np.zeros((3, 5)), "actions": np.zeros(3)}])
    with pytest.raises(ValueError, match="one common length"):
        EpisodeDataset([{"observations": {"a": np.zeros(3), "b": np.zeros(4)}, "actions": np.zeros(3)}])


@pytest.mark.parametrize(
    "observation_space, action_space, episodes, error",
    [
        (BOX4, spaces.Discrete(4), _with(_episodes(), 1, "actions", 3, 9), r"episode 1, step 3: action 9 is outside 0..3 \(the action space is Discrete\(4\)\)"),
        (BOX4, spaces.Discrete(4), _with(_episodes(), 0, "actions", 2, 0.7), "episode 0, step 2: action 0.7 is not a whole number"),
        (BOX4, spaces.Discrete(4), _with(_episodes(), 1, "actions", 4, np.nan), "episode 1, step 4: action nan is not finite"),
        (BOX4, spaces.Discrete(4), _with(_episodes(), 1, "observations", 2, [0, np.nan, 0, 0]), r"episode 1, step 2: observation \[ 0. nan  0.  0.\] is not finite"),
        (BOX4, spaces.Discrete(4), _with(_episodes(), 0, "observations", 4, [0, 3, 0, 0]), r"episode 0, step 4: observation .* is outside the bounds \(the observation space is Box"),
        (spaces.Box(0, 255, (4,), np.uint8), spaces.Discrete(4), _with(_episodes(), 0, "observations", 1, 0.5), "episode 0, step 1: observation .* is not a whole number"),
        (spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(4), _episodes(), r"each observation has shape \(4,\), but the observation space .* needs \(3,\)"),
        (BOX4, spaces.Box(-1, 1, (1,), np.float32), _episodes(), r"each action has shape \(\), but the action space .* needs \(1,\)"),
        (BOX4, spaces.MultiDiscrete([2, 3]), [{"observations": np.zeros((3, 4)), "actions": np.array([[1, 2], [1, 2], [0, 3]])}], r"episode 0, step 2: action \[0 3\] is outside"),
        (BOX4, spaces.MultiBinary(2), [{"observations": np.zeros((3, 4)), "actions": np.array([[1, 0], [2, 0], [0, 1]])}], r"episode 0, step 1: action \[2 0\] is not 0 or 1"),
        (BOX4, spaces.Tuple([spaces.Discrete(2)]), _episodes(), "is not supported"),
        (spaces.Dict(a=BOX4), spaces.Discrete(4), _episodes(), "the observations are arrays, but the observation space is a Dict"),
        (BOX4, spaces.Discrete(4), [{"observations": {"a": np.zeros((3, 4))}, "actions": np.zeros(3)}], r"the observations are dicts \(keys \['a'\]\)"),
        (spaces.Dict(a=BOX4, b=BOX4), spaces.Discrete(4), [{"observations": {"a": np.zeros((3, 4)), "c": np.zeros((3, 1))}, "actions": np.zeros(3)}], r"missing: \['b'\], not in the space: \['c'\]"),
        (spaces.Dict(a=BOX4), spaces.Discrete(4), [{"observations": {"a": np.full((3, 4), 2.0)}, "actions": np.zeros(3)}], "episode 0, step 0: observation 'a' .* is outside the bounds"),
    ],
)
def test_every_step_is_checked_against_the_spaces(observation_space, action_space, episodes, error):
    with pytest.raises(ValueError, match=error):
        EpisodeDataset(episodes).check_spaces(observation_space, action_space)


def test_valid_datasets_pass_including_whole_floats_and_column_actions(monkeypatch):
    episodes = _episodes(3, action=2)
    episodes[0]["actions"] = episodes[0]["actions"].astype(np.float32)  # 2.0: a Minari float column is fine
    episodes[1]["actions"] = episodes[1]["actions"][:, None]  # [T, 1]
    episodes[2]["actions"] = episodes[2]["actions"][:, None]
    with pytest.raises(ValueError, match="per-step shapes"):
        EpisodeDataset(episodes)
    episodes[0]["actions"] = episodes[0]["actions"][:, None]
    EpisodeDataset(episodes).check_spaces(BOX4, spaces.Discrete(4))
    # Several blocks: the bad step is still located in its own episode.
    monkeypatch.setattr(datasets, "_CHECK_BLOCK_BYTES", 64)
    bad = _with(_episodes(6, length=4), 4, "actions", 2, 7)
    with pytest.raises(ValueError, match="episode 4, step 2: action 7"):
        EpisodeDataset(bad).check_spaces(BOX4, spaces.Discrete(4))
    EpisodeDataset(_episodes(6, length=4)).check_spaces(BOX4, spaces.Discrete(4))


def test_dataset_ids_are_checked_before_any_work(minari_folder):
    for bad in ("tmaze/oracle", "bad id-v0", "tmaze/oracle-vX"):
        with pytest.raises(ValueError, match="malformed Minari dataset id"):
            check_minari_id(bad)
    assert check_minari_id("tmaze/free-v0") == minari_folder / "tmaze" / "free-v0"
    make_tmaze_dataset(3, seed=0).to_minari("tmaze/taken-v0", env="sb3_elmur/TMaze-v0")
    with pytest.raises(FileExistsError, match=r"'tmaze/taken-v0' already exists at .*taken-v0: pass overwrite=True .* EpisodeDataset.from_minari"):
        check_minari_id("tmaze/taken-v0")
    assert check_minari_id("tmaze/taken-v0", overwrite=True).is_dir()


def test_to_minari_overwrites_only_when_asked_and_keeps_the_old_dataset_on_failure(minari_folder, monkeypatch, capsys):
    import minari

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Minari's metadata reminders are silenced around our write
        make_tmaze_dataset(3, seed=0).to_minari("tmaze/oracle-v0", env=gym.make("sb3_elmur/TMaze-v0"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_tmaze_dataset(5, seed=0).to_minari("tmaze/oracle-v0", env=gym.make("sb3_elmur/TMaze-v0"))
    assert len(EpisodeDataset.from_minari("tmaze/oracle-v0")) == 3

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", broken_write)
    with pytest.raises(OSError, match="disk full"):
        make_tmaze_dataset(5, seed=0).to_minari("tmaze/oracle-v0", env="sb3_elmur/TMaze-v0", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        make_tmaze_dataset(5, seed=0).to_minari("tmaze/fresh-v0", env="sb3_elmur/TMaze-v0")
    monkeypatch.undo()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_folder))
    assert len(EpisodeDataset.from_minari("tmaze/oracle-v0")) == 3  # the old dataset survived the failed write
    assert not (minari_folder / "tmaze" / "fresh-v0").exists()  # and a failed write leaves nothing behind
    assert sorted(os.listdir(minari_folder)) == ["tmaze"]  # no staging folder left

    capsys.readouterr()
    written = make_tmaze_dataset(5, seed=0).to_minari("tmaze/oracle-v0", env="sb3_elmur/TMaze-v0", overwrite=True)
    assert written.total_episodes == 5 and len(EpisodeDataset.from_minari("tmaze/oracle-v0")) == 5
    assert f"replaced the Minari dataset tmaze/oracle-v0 at {minari_folder / 'tmaze' / 'oracle-v0'}" in capsys.readouterr().out
    assert minari.list_local_datasets().keys() == {"tmaze/oracle-v0"}
    make_tmaze_dataset(2, seed=0).to_minari("plain-v1", env="sb3_elmur/TMaze-v0")  # no namespace
    assert len(EpisodeDataset.from_minari("plain-v1")) == 2


def test_two_concurrent_writers_of_one_id_the_second_refuses(minari_folder, monkeypatch):
    """Two processes write one id at once, without overwrite: one writes, the other refuses (it used to replace the
    first one's complete dataset) and the dataset is the first one's."""
    import minari

    original = minari.create_dataset_from_buffers

    def slow_write(*args, **kwargs):  # holds the lock long enough for the other writer to meet it
        time.sleep(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(minari, "create_dataset_from_buffers", slow_write)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()

    def write(n_episodes):
        torch.set_num_threads(1)
        barrier.wait()
        try:
            make_tmaze_dataset(n_episodes, seed=0).to_minari("tmaze/race-v0", env="sb3_elmur/TMaze-v0")
            results.put((n_episodes, "wrote"))
        except FileExistsError as error:
            results.put((n_episodes, str(error)))

    writers = [context.Process(target=write, args=(n,)) for n in (3, 5)]
    for writer in writers:
        writer.start()
    outcomes = dict(results.get(timeout=120) for _ in writers)
    for writer in writers:
        writer.join(30)
    assert list(outcomes.values()).count("wrote") == 1, outcomes  # both wrote, before the lock
    (winner,) = [n for n, outcome in outcomes.items() if outcome == "wrote"]
    (refusal,) = [outcome for outcome in outcomes.values() if outcome != "wrote"]
    assert re.search("'tmaze/race-v0' (is being written by another process|already exists)", refusal)
    monkeypatch.undo()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_folder))
    assert len(EpisodeDataset.from_minari("tmaze/race-v0")) == winner
    assert sorted(os.listdir(minari_folder)) == ["tmaze"]  # no lock file or staging folder left


def test_a_write_refuses_an_id_locked_or_written_since_its_first_check(minari_folder, monkeypatch, capsys):
    dataset = make_tmaze_dataset(3, seed=0)
    with minari._exclusive_write("tmaze/locked-v0", minari_folder):
        with pytest.raises(FileExistsError, match="'tmaze/locked-v0' is being written by another process"):
            dataset.to_minari("tmaze/locked-v0", env="sb3_elmur/TMaze-v0")
        with pytest.raises(SystemExit) as exit_info:
            datasets_main(["tmaze", "--dataset-id", "tmaze/locked-v0", "--episodes", "3"])
        assert exit_info.value.code == 1
        output = capsys.readouterr()
        assert "is being written by another process" in output.err and "wrote" not in output.out
    assert not (minari_folder / "tmaze" / "locked-v0").exists()

    # Another writer finishes between this write's first check of the id and its lock: checked again under it.
    original_check = EpisodeDataset._check_env_spaces

    def other_writer_finishes(self, env):
        original_check(self, env)
        monkeypatch.setattr(EpisodeDataset, "_check_env_spaces", original_check)
        make_tmaze_dataset(5, seed=1).to_minari("tmaze/raced-v0", env="sb3_elmur/TMaze-v0")

    monkeypatch.setattr(EpisodeDataset, "_check_env_spaces", other_writer_finishes)
    with pytest.raises(FileExistsError, match="'tmaze/raced-v0' already exists"):
        dataset.to_minari("tmaze/raced-v0", env="sb3_elmur/TMaze-v0")
    assert len(EpisodeDataset.from_minari("tmaze/raced-v0")) == 5


def test_to_minari_checks_the_episodes_against_the_env_it_declares(minari_folder):
    """T-Maze episodes (actions 0..3) written for CartPole (Discrete(2)) used to give a dataset that declares
    Discrete(2) and holds action 3."""
    with pytest.raises(ValueError, match=r"do not fit the env 'CartPole-v1'.*(observation|action)"):
        make_tmaze_dataset(3, seed=0).to_minari("cartpole/wrong-v0", env="CartPole-v1")
    with pytest.raises(ValueError, match=r"do not fit the env 'CartPole-v1'"):
        make_tmaze_dataset(3, seed=0).to_minari("cartpole/wrong-v0", env=gym.make("CartPole-v1"))
    assert not minari_folder.exists() or os.listdir(minari_folder) == []


def test_command_line_checks_its_arguments_before_collecting(minari_folder, monkeypatch, capsys, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("collected episodes before checking the arguments")

    monkeypatch.setattr("sb3_elmur.datasets.__main__.make_tmaze_dataset", must_not_run)
    monkeypatch.setattr("sb3_elmur.datasets.__main__.collect_episodes", must_not_run)
    make_tmaze_dataset(2, seed=0).to_minari("tmaze/taken-v0", env="sb3_elmur/TMaze-v0")
    cases = [
        (["tmaze", "--dataset-id", "tmaze/taken-v0"], "already exists at .* --overwrite"),
        (["tmaze", "--dataset-id", "tmaze/no-version"], "malformed Minari dataset id"),
        (["tmaze", "--dataset-id", "tmaze/x-v0", "--episodes", "0"], "must be a positive integer"),
        (["collect", "--dataset-id", "cp/x-v0", "--model", "m.zip", "--env", "CartPole-v1", "--env-kwargs", "{bad"], "--env-kwargs is not valid JSON"),
        (["collect", "--dataset-id", "cp/x-v0", "--model", "m.zip", "--env", "CartPole-v1", "--env-kwargs", "[1]"], "must be a JSON dict"),
        (["collect", "--dataset-id", "cp/x-v0", "--model", "m.zip", "--env", "CartPole-v1", "--algo", "Nope"], "unknown algorithm 'Nope'"),
        (["collect", "--dataset-id", "cp/x-v0", "--model", str(tmp_path / "none.zip"), "--env", "CartPole-v1"], "none.zip: no such file"),
    ]
    for argv, error in cases:
        with pytest.raises(SystemExit) as exit_info:
            datasets_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m sb3_elmur.datasets") and __import__("re").search(error, err), (argv, err)
