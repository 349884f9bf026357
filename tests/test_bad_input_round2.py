"""Bad inputs of issue 25's second sweep (round 2): a final-action RecurrentBC zip loaded by RecurrentPPO/ElmurPPO,
tmaze_eval on a damaged zip and under Ctrl-C, models and envs of other spaces in ``datasets collect`` and
``to_recurrent_ppo``, staging folders that killed writes leave, compare's lock files, console lines and failed
runs, SAPIEN's and ManiSkill's fallback warnings, and the cost of a long RecurrentBC burn-in."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

import sb3_elmur  # noqa: F401  (registers the envs and policy names)
from sb3_elmur import ElmurPPO, compare, tmaze_eval
from sb3_elmur.common import utils
from sb3_elmur.tmaze_eval import cli as tmaze_eval_cli
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import collect_episodes, make_tmaze_dataset
from sb3_elmur.bc.datasets import Episode, EpisodeDataset
from sb3_elmur.bc.collect import make_recall_dataset
from sb3_elmur.envs import NoisyRecallEnv

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=1, n_heads=2, memory_size=2, context_length=4)
TMAZE = "sb3_elmur/PassiveTMaze-v0"


@pytest.fixture(autouse=True)
def minari_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def _cartpole_ppo(path: Path) -> Path:
    PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=16, batch_size=16, seed=0).save(path)
    return path.with_suffix(".zip")


# ------------------------------------------------------------------------------------------------------------
# 1. A RecurrentBC zip with a final-action head
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def final_action_bc(tmp_path_factory):
    """A RecurrentBC model with a trained final-action head, saved: (model, dataset, zip path)."""
    dataset = make_recall_dataset(20, length=(5, 20), wait=True, seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=True), dataset, policy_kwargs=SMALL, batch_size=4,
                        final_action_coef=0.5, seed=0)
    model.learn(2)
    path = tmp_path_factory.mktemp("bc") / "bc.zip"
    model.save(path)
    return model, dataset, path


def test_recurrent_ppo_and_elmur_ppo_load_a_final_action_bc_zip(final_action_bc):
    """They used to fail with "loaded state dict has a different number of parameter groups": the head is only for
    training, so they load the policy (and its optimizer state) and leave the head out, as for any RecurrentBC zip."""
    model, dataset, path = final_action_bc
    assert {"final_action_head.pth"}.isdisjoint(zipfile.ZipFile(path).namelist())
    obs = np.stack([episode.observations[0] for episode in dataset.episodes[:3]])
    actions = model.predict(obs, deterministic=True)[0]
    for loaded in (RecurrentPPO.load(path), ElmurPPO.load(path), utils.load_algorithm("RecurrentPPO", path)):
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
        assert len(loaded.policy.optimizer.param_groups) == 1 and loaded.policy.optimizer.state_dict()["state"]
        assert not hasattr(loaded, "final_action_head") or loaded.final_action_head is None
    # RecurrentBC itself gets the head and its optimizer back, and trains on.
    again = RecurrentBC.load(path, env=NoisyRecallEnv(wait=True))
    for p, q in zip(model.final_action_head.parameters(), again.final_action_head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved, restored = model.final_action_optimizer.state_dict(), again.final_action_optimizer.state_dict()
    assert saved["state"] and saved["state"].keys() == restored["state"].keys()
    for key, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(restored["state"][key][name], value, rtol=0, atol=0)
    again.set_dataset(dataset)
    again.learn(1)


def test_a_zip_whose_head_was_a_torch_file_of_its_own_still_loads(final_action_bc, tmp_path, monkeypatch):
    """Zips saved before the head had its own optimizer hold it as ``final_action_head.pth`` and its Adam state as a
    second parameter group of the policy's optimizer: RecurrentBC splits them back."""
    model, dataset, _ = final_action_bc
    combined = torch.optim.Adam(model.policy.parameters(), lr=3e-4)
    combined.add_param_group({"params": list(model.final_action_head.parameters())})
    combined.load_state_dict({
        "state": {**model.policy.optimizer.state_dict()["state"],
                  **{len(list(model.policy.parameters())) + i: s
                     for i, s in model.final_action_optimizer.state_dict()["state"].items()}},
        "param_groups": [model.policy.optimizer.state_dict()["param_groups"][0],
                         {**model.final_action_optimizer.state_dict()["param_groups"][0],
                          "params": [len(list(model.policy.parameters())) + i for i in range(2)]}],
    })
    old = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=True), policy_kwargs=SMALL, final_action_coef=0.5, seed=1)
    old.policy.load_state_dict(model.policy.state_dict())
    old.final_action_head.load_state_dict(model.final_action_head.state_dict())
    old.policy.optimizer, old.final_action_optimizer = combined, None  # as the old save laid them out
    monkeypatch.setattr(RecurrentBC, "_get_torch_save_params",
                        lambda self: (["policy", "policy.optimizer", "final_action_head"], []))
    old.save(tmp_path / "old")
    monkeypatch.undo()
    assert "final_action_head.pth" in zipfile.ZipFile(tmp_path / "old.zip").namelist()
    loaded = RecurrentBC.load(tmp_path / "old", env=NoisyRecallEnv(wait=True))
    for p, q in zip(model.final_action_head.parameters(), loaded.final_action_head.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert len(loaded.policy.optimizer.param_groups) == 1
    torch.testing.assert_close(loaded.final_action_optimizer.state_dict()["state"][0]["exp_avg"],
                               model.final_action_optimizer.state_dict()["state"][0]["exp_avg"], rtol=0, atol=0)
    loaded.set_dataset(dataset)
    loaded.learn(1)


# ------------------------------------------------------------------------------------------------------------
# 2. tmaze_eval: a damaged zip, Ctrl-C
# ------------------------------------------------------------------------------------------------------------


def _tmaze_eval(*argv):
    """:return: (exit status, stdout + stderr) of ``tmaze_eval.main``."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tmaze_eval.main([*map(str, argv), "--no-progress"])
            status = 0
        except SystemExit as exit:
            status = exit.code
    return status, out.getvalue() + err.getvalue()


def test_tmaze_eval_names_a_truncated_or_damaged_zip(final_action_bc, tmp_path):
    """SB3's load used to fail deep in zipfile ("wasn't a zip-file") or torch's reader, with a traceback."""
    _, _, path = final_action_bc
    whole = path.read_bytes()
    for cut, problem in ((100, r"BadZipFile: File is not a zip file"), (len(whole) // 2, r"no member 'data': truncated")):
        (tmp_path / "cut.zip").write_bytes(whole[:cut])
        status, output = _tmaze_eval(tmp_path / "cut.zip", "--algo", "RecurrentBC", "--corridors", 5, "--episodes", 2)
        assert status == 2 and "Traceback" not in output
        assert re.search(rf"cannot load the model .*cut.zip with RecurrentBC.load: .*cut.zip is not a readable saved "
                         rf"model \({problem}.*\): the file is truncated or damaged", output), output
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp_path / "no_policy.zip", "w") as target:
        for name in source.namelist():
            if name != "policy.pth":
                target.writestr(name, source.read(name))
    status, output = _tmaze_eval(tmp_path / "no_policy.zip", "--algo", "RecurrentBC", "--corridors", 5)
    assert status == 2 and "cannot load the model" in output and "Traceback" not in output


class _InterruptedAtSecondCorridor:
    """Acts right then up; Ctrl-C (KeyboardInterrupt) when the second corridor starts."""

    def __init__(self):
        self.runs = 0

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        if episode_start is not None and np.all(episode_start):
            self.runs += 1
            if self.runs == 2:
                raise KeyboardInterrupt
        return np.where(obs[:, 2] > 0.5, 0, 1), None


def test_ctrl_c_in_tmaze_eval_is_one_line_and_keeps_the_results(tmp_path, monkeypatch):
    (tmp_path / "model.zip").write_bytes(b"")
    monkeypatch.setattr(tmaze_eval_cli, "load_algorithm", lambda *args, **kwargs: _InterruptedAtSecondCorridor())
    out = tmp_path / "results.json"
    status, output = _tmaze_eval(tmp_path / "model.zip", "--corridors", 5, 9, "--episodes", 2, "--out", out)
    assert status == 130 and "Traceback" not in output
    assert f"python -m sb3_elmur.tmaze_eval: interrupted; the results of the 1 corridor(s) done are in {out}" in output
    assert [row["corridor"] for row in json.loads(out.read_text())["results"]] == [5]
    assert sorted(os.listdir(tmp_path)) == ["model.zip", "results.json"]  # the lock is gone


class _SigintInWorkers:
    """Acts right then up; a worker process sends itself SIGINT (as Ctrl-C reaches the whole process group)."""

    def __init__(self):
        self.parent = os.getpid()

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        if os.getpid() != self.parent and episode_start is not None and np.all(episode_start):
            os.kill(os.getpid(), signal.SIGINT)
        return np.where(obs[:, 2] > 0.5, 0, 1), None


def test_evaluation_workers_leave_ctrl_c_to_the_parent():
    """Each worker used to print a KeyboardInterrupt traceback of its own: the parent alone handles Ctrl-C."""
    from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze_corridors

    results = list(evaluate_tmaze_corridors(_SigintInWorkers(), [3, 4], n_episodes=4, n_workers=2))
    assert [result.corridor_length for result in results] == [3, 4]


# ------------------------------------------------------------------------------------------------------------
# 3. Models and envs of other spaces; datasets collect's threads
# ------------------------------------------------------------------------------------------------------------


def test_datasets_collect_names_a_model_of_other_spaces(tmp_path, capsys, minari_folder):
    """A CartPole PPO (observations of T-Maze's shape, 2 actions of T-Maze's 4) used to be collected on the T-Maze
    without a word, and the dataset written."""
    from sb3_elmur.datasets.__main__ import main

    model = _cartpole_ppo(tmp_path / "cartpole")
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--algo", "PPO", "--model", str(model), "--env", "sb3_elmur/TMaze-v0", "--episodes", "2",
              "--dataset-id", "tmaze/cartpole-v0"])
    assert exit_info.value.code == 2
    assert (f"--model {model}: the model's action space is Discrete(2), the env sb3_elmur/TMaze-v0's is Discrete(4)"
            in capsys.readouterr().err)
    assert not (minari_folder / "tmaze").exists()
    with pytest.raises(ValueError, match=r"action space is Discrete\(2\), the env sb3_elmur/TMaze-v0's is Discrete\(4\)"):
        collect_episodes(PPO.load(model), gym.make("sb3_elmur/TMaze-v0"), 1)


def test_to_recurrent_ppo_names_an_env_of_other_spaces():
    """It used to fail in load_state_dict with a "size mismatch" of the action net."""
    model = RecurrentBC("ElmurPolicy", "sb3_elmur/TMaze-v0", make_tmaze_dataset(4, max_corridor=4, seed=0),
                        policy_kwargs=SMALL, seed=0)
    with pytest.raises(ValueError, match=r"the model's action space is Discrete\(4\), the env CartPole-v1's is "
                                         r"Discrete\(2\): the model was made for another env"):
        model.to_recurrent_ppo("CartPole-v1")
    assert isinstance(model.to_recurrent_ppo(gym.make("sb3_elmur/TMaze-v0"), n_steps=8), RecurrentPPO)


def test_datasets_collect_runs_torch_on_one_thread(tmp_path, capsys, minari_folder):
    """The command has no option for threads: it used to run a small ElmurPolicy on all of them, with the warning
    that says to call torch.set_num_threads(1), which its user cannot."""
    from sb3_elmur.datasets.__main__ import main

    RecurrentPPO("ElmurPolicy", "sb3_elmur/TMaze-v0", policy_kwargs=SMALL, seed=0).save(tmp_path / "elmur")
    torch.set_num_threads(2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["collect", "--model", str(tmp_path / "elmur.zip"), "--env", "sb3_elmur/TMaze-v0", "--env-kwargs",
                  '{"corridor_length": 3}', "--episodes", "2", "--dataset-id", "tmaze/elmur-v0"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    assert not [w for w in caught if "threads" in str(w.message)], [str(w.message) for w in caught]
    assert "wrote tmaze/elmur-v0" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# 4. Staging folders of killed writes and installs
# ------------------------------------------------------------------------------------------------------------


def _killed_inside_staging(parent: Path, prefix: str) -> Path:
    """The staging folder of a process killed (SIGKILL) while it was writing there."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def write():
        with utils.staging_folder(parent, prefix) as folder:
            (folder / "half-written").write_text("x")
            queue.put(str(folder))
            time.sleep(60)

    process = context.Process(target=write)
    process.start()
    folder = Path(queue.get(timeout=60))
    process.kill()
    process.join(30)
    assert folder.is_dir()
    return folder


def test_staging_folders_of_killed_writers_are_removed_never_a_live_ones(tmp_path):
    killed = _killed_inside_staging(tmp_path, ".x-staging-")
    old_legacy, young_legacy = tmp_path / ".x-writing-abcd1234", tmp_path / ".x-writing-efgh5678"
    others = [tmp_path / ".x-writing-not-ours", tmp_path / "x-staging-visible", tmp_path / ".y-staging-abc"]
    for folder in (old_legacy, young_legacy, *others):
        folder.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_legacy, (two_days_ago, two_days_ago))
    with utils.staging_folder(tmp_path, ".x-staging-") as live:
        (live / "data").write_text("being written")
        # Another writer starts meanwhile: the killed one's folder goes, the live one stays.
        with utils.staging_folder(tmp_path, ".x-staging-", legacy_prefix=".x-writing-") as other:
            assert not killed.exists() and (live / "data").read_text() == "being written"
            assert not old_legacy.exists() and young_legacy.exists() and all(folder.exists() for folder in others)
            assert other.is_dir() and other != live
        assert not other.exists()
    assert not live.exists()


def test_a_dataset_write_removes_the_staging_folder_of_a_killed_write(minari_folder):
    make_tmaze_dataset(2, seed=0).to_minari("tmaze/first-v0", env="sb3_elmur/TMaze-v0")
    killed = _killed_inside_staging(minari_folder, sb3_elmur.datasets.STAGING_PREFIX)
    # A write killed between moving the old dataset aside and moving the new one in: the old one is put back.
    target = minari_folder / "tmaze" / "first-v0"
    (killed / "target").write_text(str(target))
    os.replace(target, killed / "replaced")
    # Earlier versions' staging folders, two days old: removed, but for one that holds a dataset moved aside whose
    # place it did not record.
    legacy, legacy_with_dataset = minari_folder / ".sb3_elmur-writing-abcd1234", minari_folder / ".sb3_elmur-writing-x1y2z3w4"
    (legacy / "tmaze").mkdir(parents=True)
    (legacy_with_dataset / "replaced").mkdir(parents=True)
    for folder in (legacy, legacy_with_dataset):
        os.utime(folder, (time.time() - 2 * 24 * 3600,) * 2)
    make_tmaze_dataset(3, seed=1).to_minari("tmaze/second-v0", env="sb3_elmur/TMaze-v0")
    assert not killed.exists() and not legacy.exists()
    assert sorted(os.listdir(minari_folder)) == [legacy_with_dataset.name, "tmaze"]
    assert len(EpisodeDataset.from_minari("tmaze/first-v0")) == 2 and len(EpisodeDataset.from_minari("tmaze/second-v0")) == 3


def test_a_vulkan_install_removes_the_staging_folders_of_killed_installs(tmp_path, monkeypatch):
    import shutil

    from sb3_elmur.envs import vulkan

    killed = _killed_inside_staging(tmp_path, ".lavapipe.staging-")
    legacy = tmp_path / ".lavapipe.k1ll3d_x"  # an earlier version's (mkdtemp's 8 characters), two days old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 2 * 24 * 3600,) * 2)
    monkeypatch.setattr(shutil, "which", lambda tool: None)  # stop before any download
    with pytest.raises(RuntimeError, match="`apt-get` not found"):
        vulkan.install(tmp_path / "lavapipe")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------
# 5. compare: lock files, console lines, failed runs
# ------------------------------------------------------------------------------------------------------------


def test_run_lock_files_are_removed_on_release_and_stale_ones_taken_over(tmp_path):
    path = tmp_path / "seed0.lock"
    path.write_text('{"pid": 1}')  # left by a killed holder: a file, no lock
    lock = compare.RunLock(path)
    assert lock.acquire() and f'"pid": {os.getpid()}' in path.read_text()
    assert not compare.RunLock(path).acquire()  # held
    lock.release()
    assert not path.exists()
    # While a worker that shares the lock may still run, its file stays where others open it.
    assert lock.acquire()
    lock.release(remove=False)
    assert path.exists() and lock.acquire()
    lock.release()


def test_compare_prints_a_line_per_run_and_evaluation_and_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sb3_elmur.compare", "--envs", TMAZE, "--env-kwargs", f'{TMAZE}={{"corridor_length": 3}}',
         "--policies", "MlpPolicy", "--timesteps", "256", "--n-envs", "2", "--eval-freq", "128", "--eval-episodes", "2",
         "--ppo-kwargs", '{"n_steps": 64, "batch_size": 64}', "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    run = f"[1/1] {TMAZE} MlpPolicy seed 0"
    assert f"{run}: start (log: {out / 'runs' / 'sb3_elmur-PassiveTMaze-v0' / 'MlpPolicy' / 'seed0.log'})" in lines
    steps = [int(m.group(1).replace(",", "")) for m in (re.match(rf"{re.escape(run)}: step ([\d,]+)/256, mean return "
                                                                 r"-?\d\.\d{3}$", line) for line in lines) if m]
    assert steps == [0, 128, 256], lines
    assert any(re.match(rf"{re.escape(run)}: finished in \d+ s: final mean return -?\d\.\d{{3}}, MMER -?\d\.\d{{3}}, "
                        r"success \d\.\d\d$", line) for line in lines), lines
    assert not any("rollout/" in line or "train/" in line for line in lines)  # SB3's logger tables stay in the log
    assert not list(out.rglob("*.lock"))


def test_failed_runs_are_marked_in_the_report_and_left_out_of_the_curves(tmp_path):
    def record(seed, status):
        spec = dict(env_id="E", label="L", policy="P", algo="A", seed=seed, timesteps=2048, n_envs=4, eval_freq=1024,
                    eval_episodes=5, deterministic_eval=True, env_kwargs={}, wrappers=[], ppo_kwargs={"n_steps": 256})
        steps = [0, 1024, 2048] if status == "finished" else [0]
        evaluations = dict(timesteps=steps, mean_return=[0.5] * len(steps), std_return=[0.0] * len(steps),
                           mean_length=[3.0] * len(steps))
        return dict(spec=spec, status=status, evaluations=evaluations, final_mean_return=0.5, mmer=0.5,
                    mmer_normalised=0.75, wall_time_s=1.0, n_parameters=7,
                    error="Traceback (most recent call last):\n  ...\nValueError: bad env kwarg\n")

    records = [record(0, "finished"), record(1, "failed")]
    text = compare.write_table(records, tmp_path / "results.md")
    assert "| L (P) | A | 7 | 1/2 (1 failed) |" in text
    assert "## Failed runs" in text and "- E L seed 1: ValueError: bad env kwarg (runs/E/L/seed1.log)" in text
    assert compare.summarize(records)[0]["seeds_failed"] == 1
    line, failed = compare._outcome(_record_file(tmp_path, records[1]), 1)
    assert failed and line.startswith("FAILED (failed, exit code 1): ValueError: bad env kwarg (log: ")
    if importlib_find("matplotlib"):
        import matplotlib.pyplot as plt

        plotted = []
        real_plot = plt.Axes.plot
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(plt.Axes, "plot", lambda self, x, y, **kw: plotted.append(list(x)) or real_plot(self, x, y, **kw))
            compare.plot_curves(records, tmp_path / "curves.png")
        assert plotted == [[0, 1024, 2048]]  # the failed seed (evaluated at step 0 only) does not cut the curve


def importlib_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _record_file(folder: Path, record: dict) -> Path:
    path = folder / "seed.json"
    path.write_text(json.dumps(record))
    return path


# ------------------------------------------------------------------------------------------------------------
# 6. ManiSkill: SAPIEN's and ManiSkill's fallback warnings, in every process
# ------------------------------------------------------------------------------------------------------------

_MANISKILL_SCRIPT = """
import multiprocessing as mp

def fallbacks():
    from sb3_elmur.envs import maniskill  # imports ManiSkill
    import sapien._vulkan_tricks
    from mani_skill.envs.utils.system.backend import parse_sim_and_render_backend

    sapien._vulkan_tricks._ensure_libvulkan_linux()  # warns if the system has no libvulkan
    parse_sim_and_render_backend("cpu", "gpu")  # logs a warning if there is no CUDA device to render on

if __name__ == "__main__":
    fallbacks()
    worker = mp.get_context("forkserver").Process(target=fallbacks)
    worker.start()
    worker.join()
    assert worker.exitcode == 0
"""


@pytest.mark.skipif(not importlib_find("mani_skill"), reason="needs mani-skill")
def test_maniskill_hides_the_fallback_warnings_and_says_once_what_is_used(tmp_path):
    script = tmp_path / "fallbacks.py"
    script.write_text(_MANISKILL_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr
    assert "Failed to find system libvulkan" not in result.stderr and "CUDA device was not found" not in result.stderr
    said = [line for line in result.stderr.splitlines() if "ManiSkill uses" in line]
    assert len(said) == 1, result.stderr  # the main process, not the worker
    assert re.fullmatch(r"sb3_elmur: ManiSkill uses .*, (SAPIEN's own Vulkan loader|the system's libvulkan), rendering "
                        r"on the (GPU|CPU \(no CUDA device\))", said[0]), said[0]


# ------------------------------------------------------------------------------------------------------------
# 7. RecurrentBC: the cost of burning in a long episode
# ------------------------------------------------------------------------------------------------------------


def test_a_long_burn_in_is_warned_about_once_naming_its_cost():
    """A 40,000-step episode made each gradient step take seconds of burn-in, without a word."""
    rng = np.random.default_rng(0)
    long_episode = Episode(rng.uniform(-1, 1, (1000, 4)).astype(np.float32), rng.integers(0, 4, 1000))
    env = gym.make("sb3_elmur/TMaze-v0")
    model = RecurrentBC("ElmurPolicy", env, EpisodeDataset([long_episode]), policy_kwargs=SMALL, batch_size=8,
                        sections=1, seed=0)
    with pytest.warns(UserWarning, match=r"RecurrentBC burn-in: the longest training episode has 1,000 steps.* up to "
                                         r"[\d,]+ steps here: \d+x the 4 steps \(sections x context_length\).* took "
                                         r"[\d.]+ s \(batch_size=8\).*burn_in=False"):
        model.learn(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(2)  # once
        RecurrentBC("ElmurPolicy", env, EpisodeDataset([long_episode]), policy_kwargs=SMALL, batch_size=8, sections=1,
                    burn_in=False, seed=0).learn(1)  # no burn-in, no cost
        # Episodes of usual lengths (T-Maze corridors up to 28 steps) are not warned about.
        RecurrentBC("ElmurPolicy", env, make_tmaze_dataset(20, seed=0), policy_kwargs=SMALL, batch_size=8, sections=1,
                    seed=0).learn(2)
