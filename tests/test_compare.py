"""python -m sb3_elmur.compare: settings, scores, a tiny end-to-end comparison, skipping and resuming runs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sb3_elmur import compare
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
        (dict(wrappers={TMAZE: ["sb3_elmur.wrappers.NoSuchWrapper"]}), "cannot import the wrapper"),
        (dict(wrappers={TMAZE: "sb3_elmur.wrappers.FlattenObservationWrapper"}), "must be a list of names"),
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
    def record(seed, final, mmer, wall, status="finished"):
        spec = dict(env_id="E", label="L", policy="P", algo="A", timesteps=10, seed=seed)
        return dict(spec=spec, status=status, final_mean_return=final, mmer=mmer, mmer_normalised=0.5 * mmer + 0.5,
                    wall_time_s=wall, n_parameters=7)  # fmt: skip

    (row,) = summarize([record(0, 0.2, 0.5, 10.0), record(1, 0.4, 0.9, 14.0), record(2, 0, 0, 0, status="unfinished")])
    assert (row["seeds_finished"], row["seeds_total"]) == (2, 3)
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
        assert cells[7].endswith(" s") and float(cells[7].split(" ± ")[0]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {row["label"] for row in summary} == {"ElmurPolicy", "MlpLstmPolicy"}


def test_learning_curves_png(comparison):
    pytest.importorskip("matplotlib")
    out, _, _ = comparison
    png = (out / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


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
    (path,), _ = prepare_runs(out, build_specs(settings), OPTIONS)
    # A session whose time runs out at the third rollout (the clock passes the deadline on its third reading).
    readings = iter([0.0, 0.0])
    monkeypatch.setattr(compare, "_clock", lambda: next(readings, 1e12))
    assert run_worker(path, deadline=1.0) == 0
    record = read_record(path)
    assert record["status"] == "unfinished" and record["num_timesteps"] == 2 * 64 * 4
    assert record["evaluations"]["timesteps"] == [0, 512]
    assert path.with_name("seed0_checkpoint.zip").exists()

    result = _run_cli(
        "--envs", TMAZE, "--policies", "ElmurPolicy", "--timesteps", "2048", "--n-envs", "4", "--eval-freq", "512",
        "--eval-episodes", "4", "--ppo-kwargs", '{"n_steps": 64}', "--env-kwargs", f'{TMAZE}={{"corridor_length": 5}}',
        "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert "1 runs: 0 finished (skipped), 1 to run" in result.stdout
    record = read_record(path)
    assert record["status"] == "finished" and record["sessions"] == 2 and record["num_timesteps"] == 2048
    assert record["evaluations"]["timesteps"] == [0, 512, 1024, 1536, 2048]
    assert "resuming from" in path.with_suffix(".log").read_text()
    assert not path.with_name("seed0_checkpoint.zip").exists() and path.with_name("seed0_model.zip").exists()
