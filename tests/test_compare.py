"""python -m sb3_elmur.compare: settings, scores, a tiny end-to-end comparison, skipping and resuming runs."""

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sb3_elmur import ElmurPPO, compare
from sb3_elmur.common import utils
from sb3_elmur.compare import (
    POPGYM_WRAPPERS,
    build_specs,
    prepare_runs,
    read_record,
    run_scores,
    run_worker,
    summarize,
)

torch.set_num_threads(1)

TMAZE = "sb3_elmur/PassiveTMaze-v0"
CORRIDOR = 5  # episodes of at most 7 steps, returns in [-7 / 5, 1]
TINY_ARGS = [
    "--envs", TMAZE, "--env-kwargs", f'{TMAZE}={{"corridor_length": {CORRIDOR}}}', "--timesteps", "2048",
    "--n-envs", "4", "--eval-freq", "1024", "--eval-episodes", "6", "--ppo-kwargs", '{"n_steps": 64}',
]  # fmt: skip
OPTIONS = dict(threads=1, device="cpu", elmur_scalars=True)


def _settings(**overrides):
    return {"envs": [TMAZE], "timesteps": 2048, **overrides}


# ------------------------------------------------------------------------------------------------------------
# Settings and scores
# ------------------------------------------------------------------------------------------------------------


def test_specs_cover_envs_policies_and_seeds_with_merged_kwargs():
    specs = build_specs(
        _settings(
            envs=[TMAZE, "sb3_elmur/TMaze-v0"],
            policies=["ElmurPolicy", "big=ElmurPolicy", "MlpLstmPolicy", "MlpPolicy"],
            seeds=[0, 3],
            policy_kwargs={"big": {"d_model": 64}},
            ppo_kwargs={"n_steps": 32},
        )
    )
    assert len(specs) == 2 * 4 * 2
    by_label = {spec["label"]: spec for spec in specs}
    assert by_label["big"]["policy"] == "ElmurPolicy"
    assert by_label["big"]["policy_kwargs"] == {**compare.DEFAULT_POLICY_KWARGS["ElmurPolicy"], "d_model": 64}
    assert by_label["ElmurPolicy"]["policy_kwargs"] == compare.DEFAULT_POLICY_KWARGS["ElmurPolicy"]
    assert by_label["MlpPolicy"]["algo"] == "PPO" and by_label["MlpLstmPolicy"]["algo"] == "RecurrentPPO"
    assert by_label["MlpPolicy"]["policy_kwargs"] == {}
    assert all(spec["ppo_kwargs"] == {**compare.DEFAULT_PPO_KWARGS, "n_steps": 32} for spec in specs)
    envs = (TMAZE, "sb3_elmur/TMaze-v0")
    assert {(spec["env_id"], spec["seed"]) for spec in specs} == {(env, seed) for env in envs for seed in (0, 3)}
    assert all(spec["wrappers"] == [] and spec["eval_freq"] == 204 for spec in specs)  # default: 10 evaluations


def test_popgym_ids_get_the_popgym_wrappers_unless_told_otherwise():
    popgym_id = "popgym-RepeatPreviousEasy-v0"
    specs = build_specs(_settings(envs=[popgym_id, TMAZE], policies=["MlpPolicy"]))
    assert [spec["wrappers"] for spec in specs] == [list(POPGYM_WRAPPERS), []]
    specs = build_specs(_settings(envs=[popgym_id], policies=["MlpPolicy"], wrappers={popgym_id: []}))
    assert specs[0]["wrappers"] == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(envs=[]), "no env ids"),
        (dict(policies=["NoSuchPolicy"]), "unknown policy 'NoSuchPolicy'"),
        (dict(policies=["x=ElmurPolicy", "x=MlpPolicy"]), "label 'x' is given twice"),
        (dict(policies=["a b=ElmurPolicy"]), "policy label 'a b'"),
        (dict(policy_kwargs={"MlpPolicy": {}}), r"policy kwargs given for \['MlpPolicy'\]"),
        (dict(env_kwargs={"Other-v0": {}}), r"env kwargs given for \['Other-v0'\]"),
        (dict(ppo_kwargs={"seed": 1}), r"PPO kwargs \['seed'\] are set by the comparison"),
        (dict(ppo_kwargs={"n_step": 1}), r"unknown RecurrentPPO keyword argument\(s\) \['n_step'\]"),
        (dict(policy_kwargs={"ElmurPolicy": {"activation_fn": "torch.nn.NoSuchThing"}}), "cannot import the activation_fn"),
        (dict(wrappers={TMAZE: ["sb3_elmur.envs.popgym.NoSuchWrapper"]}), "cannot import the wrapper"),
        (dict(wrappers={TMAZE: "sb3_elmur.envs.popgym.FlattenObservationWrapper"}), "must be a list of names"),
        (dict(timesteps=0), "timesteps must be a positive integer"),
        (dict(seeds=[1, 1]), "seeds are given twice"),
    ],
)
def test_bad_settings_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_specs(_settings(**overrides))


def test_command_line_overrides_the_config_file(tmp_path):
    config = tmp_path / "compare.yml"
    config.write_text(
        f"envs: [{TMAZE}]\nseeds: [4, 5]\ntimesteps: 999\n"
        "policy_kwargs:\n  ElmurPolicy: {d_model: 8, n_heads: 1}\nppo_kwargs: {n_epochs: 2}\n"
    )
    args = compare.make_parser().parse_args(
        ["--config", str(config), "--timesteps", "512", "--policy-kwargs", 'ElmurPolicy={"n_heads": 2}',
         "--ppo-kwargs", '{"n_steps": 16}']
    )  # fmt: skip
    settings = compare.settings_from_args(args)
    assert settings["seeds"] == [4, 5] and settings["timesteps"] == 512
    assert settings["policy_kwargs"] == {"ElmurPolicy": {"n_heads": 2}}  # a label's kwargs given anew replace the file's
    assert settings["ppo_kwargs"] == {"n_epochs": 2, "n_steps": 16}
    config.write_text("envs: [x]\ntimestep: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['timestep'\]"):
        compare.settings_from_args(compare.make_parser().parse_args(["--config", str(config)]))


def test_cli_reports_bad_input(capsys):
    with pytest.raises(SystemExit) as error:
        compare.main(["--envs", TMAZE, "--policy-kwargs", "ElmurPolicy={d_model: 8}"])
    assert error.value.code == 2
    assert "--policy-kwargs ElmurPolicy: invalid JSON" in capsys.readouterr().err


def test_scores_are_final_return_and_running_maximum():
    scores = run_scores([-0.8, 0.4, -0.2, 0.1])
    assert scores == dict(final_mean_return=0.1, mmer=0.4, mmer_normalised=0.7)
    with pytest.raises(ValueError, match="without evaluations"):
        run_scores([])


def test_summary_is_mean_and_std_over_finished_seeds():
    def record(seed, final, mmer, wall, status="finished", success=None, env_id="E"):
        spec = dict(env_id=env_id, label="L", policy="P", algo="A", timesteps=10, seed=seed)
        evaluations = dict(timesteps=[0, 10], success_rate=[0.0, success]) if success is not None else dict(timesteps=[0])
        return dict(spec=spec, status=status, final_mean_return=final, mmer=mmer, mmer_normalised=0.5 * mmer + 0.5,
                    wall_time_s=wall, n_parameters=7, evaluations=evaluations)  # fmt: skip

    (row,) = summarize([record(0, 0.2, 0.5, 10.0), record(1, 0.4, 0.9, 14.0), record(2, 0, 0, 0, status="unfinished")])
    assert (row["seeds_finished"], row["seeds_total"]) == (2, 3) and "final_success" not in row
    (rates,) = summarize([record(0, 0, 0, 1, success=0.25, env_id="S"), record(1, 0, 0, 1, success=0.75, env_id="S")])
    assert rates["final_success"] == pytest.approx(0.5) and rates["final_success_std"] == pytest.approx(0.25)
    assert row["final_mean_return"] == pytest.approx(0.3) and row["final_mean_return_std"] == pytest.approx(0.1)
    assert row["mmer"] == pytest.approx(0.7) and row["mmer_normalised"] == pytest.approx(0.85)
    assert row["wall_time_s"] == pytest.approx(12.0) and row["wall_time_s_std"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "sb3_elmur.compare", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """2 policies x 1 env x 2 seeds x 2048 steps, two runs at a time."""
    out = tmp_path_factory.mktemp("compare") / "out"
    args = [*TINY_ARGS, "--policies", "ElmurPolicy", "MlpLstmPolicy", "--seeds", "0", "1", "--jobs", "2", "--out", str(out)]
    result = _run_cli(*args, cwd=out.parent)
    return out, args, result


def _records(out: Path):
    return {(p.parent.name, p.stem): read_record(p) for p in sorted((out / "runs").glob("*/*/seed*.json"))}


def test_every_run_writes_a_sane_json(comparison):
    out, _, result = comparison
    assert "4 runs: 0 finished (skipped), 4 to run" in result.stdout
    assert "every 1,024 steps and at the end" in (out / "results.md").read_text()
    records = _records(out)
    assert set(records) == {(label, f"seed{s}") for label in ("ElmurPolicy", "MlpLstmPolicy") for s in (0, 1)}
    for (label, _), record in records.items():
        history = record["evaluations"]
        assert record["status"] == "finished" and record["num_timesteps"] == 2048 and record["sessions"] == 1
        assert history["timesteps"] == [0, 1024, 2048]
        returns = np.array(history["mean_return"])
        assert np.all(returns >= -(CORRIDOR + 2) / CORRIDOR - 1e-6) and np.all(returns <= 1.0)
        assert np.all(np.array(history["mean_length"]) <= CORRIDOR + 2)
        assert record["final_mean_return"] == returns[-1] and record["mmer"] == returns.max()
        assert record["mmer_normalised"] == pytest.approx(0.5 * returns.max() + 0.5)
        assert 0 < record["eval_time_s"] < record["wall_time_s"] < 600
        assert record["n_parameters"] > 10_000
        assert record["spec"]["env_kwargs"] == {"corridor_length": CORRIDOR}
        assert (out / "runs" / "sb3_elmur-PassiveTMaze-v0" / label / f"seed{record['spec']['seed']}_model.zip").exists()
    assert not list((out / "runs").rglob("*_checkpoint.zip"))
    # The report names the invocation, the code's commit and the date of every run.
    commit = subprocess.run(["git", "-C", str(Path(compare.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    provenance = (out / "results.md").read_text().split("## Provenance")[1]
    assert f"`python -m sb3_elmur.compare {shlex.join(comparison[1])}`: commit {commit}, " in provenance
    assert "(4 runs)" in provenance


def test_table_summarises_the_jsons(comparison):
    out, _, result = comparison
    table = (out / "results.md").read_text()
    assert table in result.stdout
    records = _records(out)
    for label in ("ElmurPolicy", "MlpLstmPolicy"):
        finals = [records[(label, f"seed{s}")]["final_mean_return"] for s in (0, 1)]
        mmers = [records[(label, f"seed{s}")]["mmer_normalised"] for s in (0, 1)]
        (line,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == "RecurrentPPO" and cells[3] == "2/2"
        assert cells[4] == f"{np.mean(finals):.3f} ± {np.std(finals):.3f}"
        assert cells[6] == f"{np.mean(mmers):.3f} ± {np.std(mmers):.3f}"
        successes = [records[(label, f"seed{s}")]["evaluations"]["success_rate"][-1] for s in (0, 1)]  # T-Maze's
        assert cells[7] == f"{np.mean(successes):.2f} ± {np.std(successes):.2f}"
        assert cells[8].endswith(" s") and float(cells[8].split(" ± ")[0]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {row["label"] for row in summary} == {"ElmurPolicy", "MlpLstmPolicy"}


def test_learning_curves_png(comparison):
    pytest.importorskip("matplotlib")
    out, _, _ = comparison
    for name in ("learning_curves.png", "success_curves.png"):  # T-Maze reports is_success
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_tensorboard_holds_the_evaluations_and_elmur_scalars(comparison):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, _, _ = comparison
    records = _records(out)
    for label in ("ElmurPolicy", "MlpLstmPolicy"):
        (run_dir,) = (out / "tensorboard" / "sb3_elmur-PassiveTMaze-v0").glob(f"{label}_seed0_*")
        accumulator = event_accumulator.EventAccumulator(str(run_dir))
        accumulator.Reload()
        events = accumulator.Scalars("eval/mean_return")
        history = records[(label, "seed0")]["evaluations"]
        assert [e.step for e in events] == history["timesteps"]
        np.testing.assert_allclose([e.value for e in events], history["mean_return"], rtol=1e-6)
        has_elmur = any(tag.startswith("elmur/") for tag in accumulator.Tags()["scalars"])
        assert has_elmur == (label == "ElmurPolicy")
        assert "train/loss" in accumulator.Tags()["scalars"]


def test_second_invocation_skips_finished_runs(comparison):
    out, args, _ = comparison
    before = {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("seed*.json")}
    start = time.perf_counter()
    result = _run_cli(*args, cwd=out.parent)
    assert "4 runs: 4 finished (skipped), 0 to run" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("seed*.json")} == before
    assert time.perf_counter() - start < 60
    # Other settings for the same runs are refused rather than mixed in.
    settings = compare.settings_from_args(compare.make_parser().parse_args([*args, "--timesteps", "4096"]))
    with pytest.raises(ValueError, match=r"seed0.json \(differs in timesteps\)"):
        prepare_runs(out, build_specs(settings), OPTIONS)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    settings = _settings(
        policies=["ElmurPolicy"], n_envs=4, eval_freq=512, eval_episodes=4, ppo_kwargs={"n_steps": 64},
        env_kwargs={TMAZE: {"corridor_length": CORRIDOR}},
    )  # fmt: skip
    prepared = prepare_runs(out, build_specs(settings), OPTIONS)
    (path,) = prepared.to_run
    prepared.release()  # run_worker takes the run's lock itself
    # A session whose time runs out at the third rollout (the clock passes the deadline on its third reading).
    readings = iter([0.0, 0.0])
    monkeypatch.setattr(compare.worker, "_clock", lambda: next(readings, 1e12))
    assert run_worker(path, deadline=1.0) == 0
    record = read_record(path)
    assert record["status"] == "unfinished" and record["num_timesteps"] == 2 * 64 * 4
    assert record["evaluations"]["timesteps"] == [0, 512]
    checkpoint = path.with_name("seed0_checkpoint.zip")
    assert checkpoint.exists()
    # A kill during the next save leaves a partly written temporary file beside the intact checkpoint.
    good_checkpoint = checkpoint.read_bytes()
    leftovers = [path.with_name(".seed0_checkpoint.zip.k1ll3d.tmp.zip"), path.with_name(".seed0.json.k1ll3d.tmp.json")]
    for leftover in leftovers:
        leftover.write_bytes(good_checkpoint[: len(good_checkpoint) // 3])

    result = _run_cli(
        "--envs", TMAZE, "--policies", "ElmurPolicy", "--timesteps", "2048", "--n-envs", "4", "--eval-freq", "512",
        "--eval-episodes", "4", "--ppo-kwargs", '{"n_steps": 64}', "--env-kwargs", f'{TMAZE}={{"corridor_length": 5}}',
        "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert "1 runs: 0 finished (skipped), 1 to run" in result.stdout
    record = read_record(path)
    assert record["status"] == "finished" and record["sessions"] == 2 and record["num_timesteps"] == 2048
    assert record["evaluations"]["timesteps"] == [0, 512, 1024, 1536, 2048]
    log = path.with_suffix(".log").read_text()
    assert "resuming from" in log and "restarting" not in log
    assert f"removed {leftovers[0]}, left by a write that was interrupted" in log
    assert not any(leftover.exists() for leftover in leftovers)
    assert not path.with_name("seed0_checkpoint.zip").exists() and path.with_name("seed0_model.zip").exists()


def _half_done_run(out, specs):
    """The record of one prepared run, marked unfinished at 128 of its steps with a made-up evaluation history."""
    prepared = prepare_runs(out, specs, OPTIONS)
    (path,) = prepared.to_run
    prepared.release()
    record = read_record(path)
    record.update(status="unfinished", num_timesteps=128)
    record["evaluations"] = dict(timesteps=[0, 128], mean_return=[9.0, 9.0], std_return=[0, 0], mean_length=[1, 1])
    utils.write_json_atomically(path, record)
    return path


def test_unloadable_checkpoint_restarts_the_run_and_is_kept(tmp_path, capsys):
    # E.g. a checkpoint cut short by a kill while an older version wrote it in place: "wasn't a zip-file".
    out = tmp_path / "out"
    settings = _settings(
        policies=["MlpPolicy"], timesteps=256, n_envs=4, eval_freq=128, eval_episodes=2, ppo_kwargs={"n_steps": 32},
        env_kwargs={TMAZE: {"corridor_length": CORRIDOR}},
    )  # fmt: skip
    path = _half_done_run(out, build_specs(settings))
    checkpoint = path.with_name("seed0_checkpoint.zip")
    checkpoint.write_bytes(b"PK\x03\x04 cut short")
    assert run_worker(path) == 0
    assert "cannot load the checkpoint" in capsys.readouterr().out
    record = read_record(path)
    assert record["status"] == "finished" and record["num_timesteps"] == 256
    assert record["evaluations"]["timesteps"] == [0, 128, 256] and 9.0 not in record["evaluations"]["mean_return"]
    assert checkpoint.with_name("seed0_checkpoint.zip.broken").read_bytes() == b"PK\x03\x04 cut short"
    assert not checkpoint.exists() and path.with_name("seed0_model.zip").exists()


def test_checkpoint_of_another_configuration_is_kept_aside_and_the_run_restarts(tmp_path, capsys):
    """A d_model 8 checkpoint under a d_model 16 spec used to be resumed: the run "finished" with the wrong model
    (and parameter count) and a history mixed from both."""
    out = tmp_path / "out"
    small = dict(n_layers=1, n_heads=2, memory_size=2, context_length=4)
    settings = _settings(
        policies=["ElmurPolicy"], timesteps=256, n_envs=4, eval_freq=128, eval_episodes=2, ppo_kwargs={"n_steps": 32},
        env_kwargs={TMAZE: {"corridor_length": CORRIDOR}}, policy_kwargs={"ElmurPolicy": dict(small, d_model=16)},
    )  # fmt: skip
    (spec,) = build_specs(settings)
    path = _half_done_run(out, [spec])
    algo, (_, policy_class) = utils.algorithm_class(spec["algo"]), compare.resolve_policy(spec["policy"])
    other = algo(policy_class, compare.make_env(spec, 4, 0), policy_kwargs=dict(small, d_model=8), n_steps=32)
    other.num_timesteps = 128
    checkpoint = path.with_name("seed0_checkpoint.zip")
    other.save(checkpoint)
    saved = checkpoint.read_bytes()
    expected = algo(policy_class, compare.make_env(spec, 4, 0), policy_kwargs=dict(small, d_model=16), n_steps=32)
    assert run_worker(path) == 0
    log = capsys.readouterr().out
    assert "cannot resume from the checkpoint" in log and "d_model=8 against 16" in log and "resuming" not in log
    record = read_record(path)
    assert record["status"] == "finished" and record["num_timesteps"] == 256
    assert record["n_parameters"] == sum(p.numel() for p in expected.policy.parameters())
    assert record["evaluations"]["timesteps"] == [0, 128, 256] and 9.0 not in record["evaluations"]["mean_return"]
    assert checkpoint.with_name("seed0_checkpoint.zip.broken").read_bytes() == saved


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "seed0_checkpoint.zip"
    target.write_bytes(b"previous checkpoint")

    def killed_while_writing(tmp):
        assert tmp.parent == target.parent and tmp.name.endswith(".zip")  # model.save keeps a name ending in .zip
        tmp.write_bytes(b"half a che")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        utils.write_atomically(target, killed_while_writing)
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(tmp_path.iterdir()) == [target]
    utils.write_text_atomically(target, "new")
    reference = tmp_path / "reference"
    reference.write_text("")
    assert target.read_text() == "new" and target.stat().st_mode == reference.stat().st_mode  # the usual permissions


def test_unreadable_run_record_is_named(tmp_path, capsys):
    out = tmp_path / "out"
    (spec,) = build_specs(_settings(policies=["MlpPolicy"]))
    record_path = compare.RunPaths(out, spec).record
    record_path.parent.mkdir(parents=True)
    record_path.write_text('{"spec": {"env_id": ')
    with pytest.raises(ValueError, match=r"cannot read the run record .*seed0\.json .*delete it to redo the run"):
        prepare_runs(out, [spec], OPTIONS)
    with pytest.raises(SystemExit):
        compare.main(["--report-only", "--out", str(out)])
    err = capsys.readouterr().err
    assert f"left out of the report: cannot read the run record {record_path}" in err
    assert "--report-only: no readable run records in" in err


def test_a_run_locked_by_another_process_is_skipped_and_named(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--envs", TMAZE, "--policies", "MlpPolicy", "--timesteps", "256", "--out", str(out)]
    (spec,) = build_specs(_settings(policies=["MlpPolicy"], timesteps=256))
    paths = compare.RunPaths(out, spec)
    prepare_runs(out, [spec], OPTIONS).release()
    before = paths.record.stat().st_mtime_ns
    other = compare.RunLock(paths.lock)  # another open of the lock file conflicts, as another process's would
    assert other.acquire()
    try:
        assert compare.main(args) == 0
        stdout = capsys.readouterr().out
        assert "1 runs: 0 finished (skipped), 1 running elsewhere (skipped), 0 to run" in stdout
        assert f"skipped, running elsewhere: {paths.record} (locked by pid {os.getpid()} on {socket.gethostname()}" in stdout
        assert run_worker(paths.record) == 2
        assert f"is locked by pid {os.getpid()}" in capsys.readouterr().err
        assert paths.record.stat().st_mtime_ns == before and read_record(paths.record)["status"] == "pending"
        assert not paths.log.exists() and not paths.checkpoint.exists()
    finally:
        other.release()
    # The lock file goes with its holder's release (tests/test_bad_input_round2.py: and a stale file is taken over).
    assert not paths.lock.exists()
    prepared = prepare_runs(out, [spec], OPTIONS)
    assert prepared.to_run == [paths.record] and not prepared.busy
    prepared.release()


def test_report_states_the_real_evaluation_interval(tmp_path):
    def record(seed, steps, status="finished"):
        spec = dict(env_id="E", label="L", policy="P", algo="A", seed=seed, timesteps=3000, n_envs=4, eval_freq=300,
                    eval_episodes=5, deterministic_eval=True, env_kwargs={}, wrappers=[],
                    ppo_kwargs={"n_steps": 256})  # fmt: skip
        n = len(steps)
        evaluations = dict(timesteps=steps, mean_return=[0.5] * n, std_return=[0.0] * n, mean_length=[3.0] * n)
        return dict(spec=spec, status=status, evaluations=evaluations, final_mean_return=0.5, mmer=0.5,
                    mmer_normalised=0.75, wall_time_s=1.0, n_parameters=7)  # fmt: skip

    finished = record(0, [0, 1024, 2048, 3072])
    text = compare.write_table([finished, record(1, [0, 1024], "unfinished")], tmp_path / "results.md")
    assert "evaluation episodes at step 0, every 1,024 steps (--eval-freq 300, rounded up to rollout boundaries)" in text
    assert "every 300 steps" not in text and text == (tmp_path / "results.md").read_text()
    # The off-schedule evaluation at the end of a run is not an interval.
    assert compare.evaluation_schedule([record(0, [0, 300, 600, 700])]) == "at step 0, every 300 steps and at the end"
    # Other settings (here another rollout size) are a section of their own, never averaged together.
    other = record(2, [0, 1536, 3072])
    other["spec"]["ppo_kwargs"] = {"n_steps": 512}
    text = compare.write_table([finished, other], tmp_path / "results.md")
    assert text.count("## E") == 2 and "every 1,536 steps" in text and text.count("| L (P) | A | 7 | 1/1 |") == 2


def test_report_scores_each_policy_against_the_reference(tmp_path):
    def record(label, seed, normalised):
        spec = dict(env_id="E", label=label, policy="P", algo="A", seed=seed, timesteps=100, n_envs=1, eval_freq=50,
                    eval_episodes=5, deterministic_eval=True, env_kwargs={}, wrappers=[], ppo_kwargs={"n_steps": 50})
        mmer = 2 * normalised - 1
        evaluations = dict(timesteps=[0, 50, 100], mean_return=[mmer] * 3, std_return=[0.0] * 3, mean_length=[3.0] * 3)
        return dict(spec=spec, status="finished", evaluations=evaluations, final_mean_return=mmer, mmer=mmer,
                    mmer_normalised=normalised, wall_time_s=1.0, n_parameters=7)  # fmt: skip

    # Normalised MMER per seed: the reference R at 0.50 +- 0.01; A ahead, B tied (within 0.005), C behind by more
    # than twice the pooled std, D behind but within it.
    scores = dict(R=(0.49, 0.51), A=(0.51, 0.53), B=(0.50, 0.508), C=(0.40, 0.42), D=(0.47, 0.51))
    records = [record(label, seed, value) for label, values in scores.items() for seed, value in enumerate(values)]
    text = compare.write_table(records, tmp_path / "results.md", reference="R")
    cells = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in text.splitlines() if "| A |" in line}
    assert cells == {"R (P)": "-", "A (P)": "ahead (+0.020)", "B (P)": "tie (+0.004)",
                     "C (P)": "behind (-0.090), beyond 2 std", "D (P)": "behind (-0.010)"}  # fmt: skip
    tally = text.split("## Against R")[1].split("## Provenance")[0]
    assert "- A: ahead on 1, tied on 0, behind on 0 (beyond 2 std on 0) of 1 env(s)" in tally
    assert "- C: ahead on 0, tied on 0, behind on 1 (beyond 2 std on 1) of 1 env(s)" in tally
    assert "against R" not in compare.write_table(records, tmp_path / "results.md")


def test_curve_labels_count_seeds_in_the_singular_and_plural():
    assert compare.curve_label("ElmurPolicy", 1) == "ElmurPolicy (1 seed)"
    assert compare.curve_label("lstm", 3) == "lstm (3 seeds)"


def test_cli_names_the_real_command_and_every_default(capsys):
    parser = compare.make_parser()
    assert parser.format_usage().startswith("usage: python -m sb3_elmur.compare ")
    for action in parser._actions:
        if action.help != argparse.SUPPRESS and action.dest != "help":
            assert "default" in action.help, action.dest


def test_unwritable_out_fails_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as error:
        compare.main(["--envs", TMAZE, "--policies", "MlpPolicy", "--out", str(blocker / "out")])
    assert error.value.code == 2
    assert f"the output folder --out {blocker / 'out'} is not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--report-only", "--out", str(tmp_path / "empty")])
    assert "--report-only: no run records in" in capsys.readouterr().err


def test_report_covers_the_runs_of_earlier_invocations(comparison, tmp_path, capsys, monkeypatch):
    out, _, _ = comparison
    out = Path(shutil.copytree(out, tmp_path / "out"))

    def launch_in_process(record_paths, jobs, deadline, locks, archive):  # a worker process would import torch anew (slow)
        return [path for path in record_paths if run_worker(path, deadline, locks[path].fd) != 0]

    monkeypatch.setattr(compare.cli, "launch_runs", launch_in_process)
    # A second invocation on the same --out with runs disjoint from the first one's.
    assert compare.main([*TINY_ARGS, "--policies", "MlpPolicy", "--seeds", "1", "--out", str(out)]) == 0
    assert "1 runs: 0 finished (skipped), 1 to run" in capsys.readouterr().out
    table = (out / "results.md").read_text()
    for label, seeds in (("ElmurPolicy", "2/2"), ("MlpLstmPolicy", "2/2"), ("MlpPolicy", "1/1")):
        (line,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
        assert f"| {seeds} |" in line
    assert table.split("## Provenance")[0].count("## ") == 1  # same settings: one section (then the provenance)
    summary = json.loads((out / "summary.json").read_text())
    assert {(row["label"], tuple(row["seeds"])) for row in summary} == {
        ("ElmurPolicy", (0, 1)), ("MlpLstmPolicy", (0, 1)), ("MlpPolicy", (1,))
    }  # fmt: skip


def test_archive_rebuilds_the_report_and_skips_its_runs_without_their_folder(comparison, tmp_path, capsys):
    """A fresh clone holds the archive but no run folder: the report is rebuilt and no archived run is redone."""
    out, args, _ = comparison
    table = (out / "results.md").read_text()
    archive = tmp_path / "results" / "archive.json"
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    assert compare.main([*args[:-1], str(copy), "--archive", str(archive)]) == 0  # all finished: nothing trains
    archived = compare.read_archive(archive)
    assert [(r["spec"]["label"], r["spec"]["seed"]) for r in archived] == [
        ("ElmurPolicy", 0), ("ElmurPolicy", 1), ("MlpLstmPolicy", 0), ("MlpLstmPolicy", 1)
    ]  # fmt: skip
    assert archived == [record for _, record in sorted(_records(out).items())]
    fresh = tmp_path / "fresh"
    assert compare.main(["--report-only", "--out", str(fresh), "--archive", str(archive)]) == 0
    assert (fresh / "results.md").read_text() == table
    capsys.readouterr()
    assert compare.main([*args[:-1], str(fresh), "--archive", str(archive)]) == 0
    assert "4 runs: 4 finished (skipped), 0 to run" in capsys.readouterr().out
    # Other settings for the archived runs are refused before any training, naming the archive.
    with pytest.raises(SystemExit):
        compare.main([*args[:-1], str(tmp_path / "other"), "--archive", str(archive), "--timesteps", "4096"])
    err = capsys.readouterr().err
    assert f"the archive {archive} holds these runs with other settings" in err and "differs in timesteps" in err
    assert not (tmp_path / "other" / "runs").exists()
    # The report scores the policies against a reference label; an unknown label is refused before any work.
    assert compare.main(["--report-only", "--out", str(fresh), "--reference", "MlpLstmPolicy"]) == 0
    assert "| ElmurPolicy | RecurrentPPO |" in capsys.readouterr().out and "## Against MlpLstmPolicy" in (
        fresh / "results.md").read_text()
    with pytest.raises(SystemExit):
        compare.main([*args[:-1], str(fresh), "--reference", "LSTM"])
    assert "--reference LSTM: no policy of that label in this comparison" in capsys.readouterr().err
    archive.write_text('{"format": "sb3_elmur.compare archive 1", "records": [{"spec": {}}]}')
    with pytest.raises(SystemExit):
        compare.main(["--report-only", "--out", str(fresh), "--archive", str(archive)])
    assert f"record 0 of the archive {archive} is not a run record of sb3_elmur.compare" in capsys.readouterr().err


def test_archive_additions_wait_for_each_other(comparison, tmp_path):
    """Two invocations adding to one archive at the same moment: the second waits for the first's lock, then adds
    to what the first wrote, so no record is lost."""
    import threading

    out, _, _ = comparison
    first, second = [record for _, record in sorted(_records(out).items())][:2]
    archive = tmp_path / "archive.json"
    lock = tmp_path / ".archive.json.lock"
    held = utils.open_locked(lock)  # the other invocation, between its read and its write
    adding = threading.Thread(target=compare.add_to_archive, args=(archive, [second]))
    adding.start()
    adding.join(0.5)
    assert adding.is_alive()  # waiting for the lock
    utils.write_json_atomically(archive, dict(format=compare.ARCHIVE_FORMAT, records=[first]))  # its write
    lock.unlink()
    os.close(held)
    adding.join(10)
    assert not adding.is_alive() and compare.read_archive(archive) == [first, second] and not lock.exists()


def test_elmur_ppo_runs_as_an_algorithm_of_the_comparison(tmp_path):
    """``ALGO:POLICY`` picks the algorithm: the run trains with ElmurPPO and the table names it. With --archive, the
    run's record goes to the archive as the run finishes."""
    out, archive = tmp_path / "out", tmp_path / "archive.json"
    _run_cli(*TINY_ARGS, "--policies", "ElmurPPO:ElmurPolicy", "--out", str(out), "--archive", str(archive), cwd=tmp_path)
    ((label, _), record), = _records(out).items()
    assert compare.read_archive(archive) == [record]
    assert label == "ElmurPPO-ElmurPolicy" and record["spec"]["algo"] == "ElmurPPO" and record["status"] == "finished"
    model_path = out / "runs" / "sb3_elmur-PassiveTMaze-v0" / label / "seed0_model.zip"
    assert ElmurPPO.load(model_path, device="cpu").num_timesteps == 2048
    assert "| ElmurPPO-ElmurPolicy (ElmurPPO:ElmurPolicy) | ElmurPPO |" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="ElmurPPO does not take the policy 'MlpLstmPolicy'"):
        build_specs(dict(envs=[TMAZE], policies=["ElmurPPO:MlpLstmPolicy"]))
