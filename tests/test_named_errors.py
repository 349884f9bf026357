"""Bad inputs that used to fail deep inside torch, SB3 or a worker: each is refused early, by a named error that
names the argument, the bad value and what is expected (issue 25, "Obscure errors")."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.common.policies import ElmurPolicy, NonFiniteError
from tests.dummy_envs import NonFiniteStepEnv, RandomLengthEnv

torch.set_num_threads(1)

SMALL = dict(d_model=16, n_layers=2, n_heads=2, memory_size=2, context_length=4)


@pytest.mark.parametrize("algorithm", [RecurrentPPO, ElmurPPO], ids=["RecurrentPPO", "ElmurPPO"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observations_are_named_in_learn(algorithm, bad):
    model = algorithm("ElmurPolicy", NonFiniteStepEnv(bad, "observation"), n_steps=16, batch_size=16, n_epochs=1, seed=0,
                      policy_kwargs=SMALL)
    with pytest.raises(NonFiniteError, match=rf"observation holds 1 NaN or inf value\(s\), the first {bad} at index "
                                             r"\[0, 1\].*VecCheckNan"):
        model.learn(16)


def test_non_finite_observations_are_named_in_predict():
    policy = ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4, **SMALL)
    obs = np.zeros((2, 3), dtype=np.float32)
    obs[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"ElmurPolicy.predict: observation .* nan at index \[1, 2\]"):
        policy.predict(obs)
    policy.predict(np.zeros(3, dtype=np.float32))  # finite ones act as before
    dict_policy = ElmurPolicy(
        spaces.Dict({"a": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32), "b": spaces.Discrete(3)}),
        spaces.Discrete(3), lambda _: 3e-4, features_extractor_class=sb3_elmur.common.policies.CombinedExtractor, **SMALL,
    )
    with pytest.raises(NonFiniteError, match=r"observation\['a'\] holds 1 NaN or inf value\(s\), the first -?inf"):
        dict_policy.predict({"a": np.array([0.0, -np.inf], dtype=np.float32), "b": 1})


@pytest.fixture
def eight_gb(monkeypatch):
    """The machine has 8 GB available, whatever this one has: the refusals below do not depend on it."""
    monkeypatch.setattr(sb3_elmur.common.checks, "available_memory_bytes", lambda device=None: 8 * 10**9)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(memory_size=10**8), r"mostly memory_size=100000000: the initial memory"),
        (dict(d_model=2**20, n_layers=2), r"mostly d_model=1048576: 2 layers of about 32 x d_model\*\*2 weights"),
        (dict(context_length=10**7), r"mostly context_length=10000000: per layer, context_length\*\*2"),
        (dict(distance_bias="clamped", max_distance=10**10), r"mostly max_distance=10000000000"),
    ],
)
def test_huge_sizes_are_refused_before_allocating(eight_gb, kwargs, named):
    config = sb3_elmur.ElmurConfig(**kwargs)  # a config alone allocates nothing
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=rf"ElmurModel with .*\({named}.*\) needs about "
                                                               r"[\d.]+ [TGP]B, more than the 8.0 GB of RAM available"):
        sb3_elmur.ElmurModel(4, config)
    argument = named.split()[1].split("=")[0]
    with pytest.raises(ValueError, match=rf"ElmurPolicy with .*\(mostly {argument}=.*reduce {argument}"):  # both
        ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4, **kwargs)


def test_policy_counts_its_recurrent_states(eight_gb):
    # 4.1 GB of model (initial memory and its temporary), three states of 2.1 GB: more than 8 GB.
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=r"memory_size=4000000 and context_length=10: 3 "
                                                               r"recurrent state\(s\) of 2.1 GB each"):
        ElmurPolicy(spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), spaces.Discrete(3), lambda _: 3e-4,
                    memory_size=4_000_000, d_model=64, n_layers=2)


def test_huge_memory_horizon_is_refused_before_allocating(eight_gb):
    env = RandomLengthEnv(spaces.Discrete(2))
    with pytest.raises(ValueError, match=r"memory_horizon must be a non-negative integer, got 2000000.0"):
        ElmurPPO("ElmurPolicy", env, memory_horizon=2e6, policy_kwargs=SMALL)
    with pytest.raises(sb3_elmur.InsufficientMemoryError, match=r"ElmurPPO with memory_horizon=2000000, n_steps=128, "
                                                               r"n_envs=1 .*training activations of 4 row\(s\) of up to "
                                                               r"2000035 steps.*reduce memory_horizon"):
        ElmurPPO("ElmurPolicy", env, memory_horizon=2 * 10**6, sequence_length=32, policy_kwargs=SMALL)
    ElmurPPO("ElmurPolicy", env, memory_horizon=1000, policy_kwargs=SMALL)  # a sensible one still fits


def test_elmur_ppo_names_the_algorithm_of_other_policies():
    env = RandomLengthEnv(spaces.Discrete(2))
    with pytest.raises(ValueError, match=r"got policy='MlpLstmPolicy': 'MlpLstmPolicy' is a policy of sb3-contrib's "
                                         r"RecurrentPPO: use RecurrentPPO\('MlpLstmPolicy', env\)"):
        ElmurPPO("MlpLstmPolicy", env)
    with pytest.raises(ValueError, match=r"one of \['CnnElmurPolicy', 'ElmurPolicy', 'MultiInputElmurPolicy'\], "
                                         r"got policy='Big'"):
        ElmurPPO("Big", env)


@pytest.mark.parametrize("net_arch", ["big", [64, "64"], [0], dict(pi=[64], qf=[64]), dict(pi="big")])
def test_bad_net_arch_is_named(net_arch):
    env = RandomLengthEnv(spaces.Discrete(2))
    for algorithm in (RecurrentPPO, ElmurPPO):
        with pytest.raises(ValueError, match=r"net_arch must be None, a list of positive layer widths .*, got "):
            algorithm("ElmurPolicy", env, policy_kwargs=dict(net_arch=net_arch, **SMALL))
    ElmurPPO("ElmurPolicy", env, policy_kwargs=dict(net_arch=dict(pi=[8], vf=[]), **SMALL))  # good ones still work


def test_images_smaller_than_nature_cnn_takes_are_named():
    small = spaces.Box(0, 255, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"observation is an image of 32x32 pixels .* at least 36x36. Resize"):
        ElmurPPO("CnnElmurPolicy", RandomLengthEnv(spaces.Discrete(2), small), policy_kwargs=SMALL)
    dict_space = spaces.Dict({"camera": small, "state": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"observation\['camera'\] is an image of 32x32 pixels"):
        RecurrentPPO("MultiInputElmurPolicy", RandomLengthEnv(spaces.Discrete(2), dict_space), policy_kwargs=SMALL)
    # 36 x 36 is the smallest that works, channel-first or channel-last.
    for shape in ((36, 36, 1), (1, 36, 40)):
        model = ElmurPPO("CnnElmurPolicy", RandomLengthEnv(spaces.Discrete(2), spaces.Box(0, 255, shape, np.uint8)),
                         n_steps=8, batch_size=8, n_epochs=1, policy_kwargs=SMALL)
        model.learn(8)


@pytest.mark.parametrize("actions", [[0, 1, 2], [[0, 1], [2, 3], [0, 0]], 1])
def test_tmaze_step_names_a_wrong_number_of_actions(actions):
    env = TMazeVecEnv(4, seed=0)
    env.reset()
    with pytest.raises(ValueError, match=r"TMazeVecEnv.step expects one action per env, 4 actions, got \d"):
        env.step(np.array(actions))
    env.step(np.array([2, 2, 2, 2]))  # the env is still usable


@pytest.mark.parametrize("seed", ["abc", -1, 1.5, True])
def test_maniskill_seed_is_checked_before_any_work(monkeypatch, seed):
    from sb3_elmur.envs.maniskill import vec_env

    def no_work(*args, **kwargs):
        raise AssertionError("the seed must be refused before the task is looked up or a worker starts")

    monkeypatch.setattr(vec_env, "check_task", no_work)
    monkeypatch.setattr(vec_env, "_check_observation_settings", no_work)
    with pytest.raises(ValueError, match=rf"ManiSkillVecEnv seed must be a non-negative integer, got {seed!r}"):
        vec_env.ManiSkillVecEnv("PickCube-v1", seed=seed, sim_backend="cpu")


# ------------------------------------------------------------------------------------------------------------
# python -m sb3_elmur.compare: refused before any worker starts
# ------------------------------------------------------------------------------------------------------------

TMAZE = "sb3_elmur/PassiveTMaze-v0"


def _compare_error(capsys, argv) -> str:
    from sb3_elmur import compare

    launched = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare.cli, "launch_runs", lambda *args, **kwargs: launched.append(args) or [])
        with pytest.raises(SystemExit) as error:
            compare.main(argv)
    assert error.value.code == 2 and not launched
    return capsys.readouterr().err


def test_compare_refuses_a_recurrent_policy_for_ppo(capsys, tmp_path):
    err = _compare_error(capsys, ["--envs", TMAZE, "--policies", "PPO:ElmurPolicy", "--out", str(tmp_path)])
    assert "PPO does not take the recurrent policy 'ElmurPolicy' (in 'PPO:ElmurPolicy'): use RecurrentPPO:ElmurPolicy" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--envs", "NoSuchEnv-v0"], "cannot make the env 'NoSuchEnv-v0'"),
        (["--envs", TMAZE, "--env-kwargs", f'{TMAZE}={{"corridor_length": -3}}'], r"corridor_length.*must be an int >= 1"),
        (["--envs", TMAZE, "--ppo-kwargs", '{"n_steps": "abc"}'], r"cannot set up RecurrentPPO with the policy ElmurPolicy"),
        (["--envs", TMAZE, "--policy-kwargs", 'ElmurPolicy={"d_model": "x"}'], r"d_model must be a positive integer, got 'x'"),
    ],
)
def test_compare_sets_up_every_run_before_launching(capsys, tmp_path, argv, message):
    err = _compare_error(capsys, argv + ["--policies", "ElmurPolicy", "--timesteps", "64", "--out", str(tmp_path)])
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.yml", None, r"--config .*missing.yml: cannot read it \(No such file or directory\)"),
        ("bad.yml", "envs: [a\nseeds: 3\n", r"--config .*bad.yml: invalid YAML"),
        ("bad.json", '{"envs": ', r"--config .*bad.json: invalid JSON"),
        ("seeds.yml", f"envs: [{TMAZE}]\nseeds: 3\n", r"seeds must be a list, e.g. seeds: \[3\], got 3"),
        ("envs.yml", f"envs: {TMAZE}\n", r"envs must be a list, e.g. envs: \[sb3_elmur/PassiveTMaze-v0\]"),
        ("kwargs.yml", f"envs: [{TMAZE}]\nppo_kwargs: 3\n", r"ppo_kwargs must be a mapping, got 3"),
    ],
)
def test_compare_names_a_malformed_config_file(capsys, tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    err = _compare_error(capsys, ["--config", str(path), "--out", str(tmp_path / "out")])
    assert __import__("re").search(message, err), err


def test_report_only_names_a_record_without_evaluations(capsys, tmp_path):
    from sb3_elmur import compare

    (spec,) = compare.build_specs({"envs": [TMAZE], "policies": ["MlpPolicy"], "timesteps": 64})
    path = compare.RunPaths(tmp_path, spec).record
    path.parent.mkdir(parents=True)
    record = compare.new_record(spec, {})
    record.update(status=compare.FINISHED, final_mean_return=1.0, mmer=1.0, mmer_normalised=1.0)
    del record["evaluations"]
    path.write_text(__import__("json").dumps(record))
    err = _compare_error(capsys, ["--report-only", "--out", str(tmp_path)])
    assert f"left out of the report: the run record {path} lacks timesteps, mean_return" in err
    assert "--report-only: no readable run records" in err


@pytest.mark.parametrize("data", [b"{not json", None, b"[1, 2]"])
def test_checkpoint_with_unreadable_data_is_named(tmp_path, data):
    import zipfile

    from sb3_elmur import compare

    path = tmp_path / "checkpoint.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("policy.pth", b"weights")
        if data is not None:
            archive.writestr("data", data)
    problem = compare._zip_problem(path)
    assert problem is not None and "'data'" in problem
    record = {"num_timesteps": 128}
    assert compare.load_checkpoint(ElmurPPO, path, record, None, "cpu") is None  # kept as .broken, run restarted
    assert path.with_name("checkpoint.zip.broken").exists() and not path.exists()


# ------------------------------------------------------------------------------------------------------------
# python -m sb3_elmur.envs.vulkan install (nothing is downloaded: the tools are "missing" after the checks)
# ------------------------------------------------------------------------------------------------------------


def _fake_install(folder, library):
    """An install of lavapipe in ``folder`` as install() lays it out, with ``library`` (an ELF file) as driver."""
    import json
    import shutil

    from sb3_elmur.envs.vulkan import installer

    lib = folder / installer._LIB
    lib.mkdir(parents=True)
    shutil.copyfile(library, lib / installer._DRIVER)
    icd = {"file_format_version": "1.0.0", "ICD": {"library_path": str(lib / installer._DRIVER), "api_version": "1.3.0"}}
    (folder / installer._ICD).write_text(json.dumps(icd))
    (folder / installer._MANIFEST).write_text(json.dumps({"codename": "x", "packages": {}, "preload": []}))
    return lib / installer._DRIVER


def test_vulkan_install_reinstalls_a_truncated_driver(tmp_path, monkeypatch, capsys):
    import shutil

    from sb3_elmur.envs import vulkan
    from sb3_elmur.envs.vulkan.elf import _elf_problem

    library = Path(torch.__file__).parent / "lib" / "libc10.so"  # a real ELF shared library wherever torch is
    if not library.is_file():
        pytest.skip("torch ships no libc10.so here")
    driver = _fake_install(tmp_path / "lavapipe", library)
    assert vulkan.is_installed(tmp_path / "lavapipe")
    assert vulkan.install(tmp_path / "lavapipe", verbose=True) == tmp_path / "lavapipe"  # whole: nothing to do
    assert "already installed" in capsys.readouterr().err
    with open(driver, "r+b") as f:  # cut short, as by a killed copy
        f.truncate(driver.stat().st_size // 2)
    assert "truncated" in _elf_problem(driver)
    assert not vulkan.is_installed(tmp_path / "lavapipe")
    monkeypatch.setattr(shutil, "which", lambda tool: None)  # stop before any download
    with pytest.raises(RuntimeError, match="`apt-get` not found"):
        vulkan.install(tmp_path / "lavapipe", verbose=True)
    err = capsys.readouterr().err
    assert "already installed" not in err
    assert f"the lavapipe install in {tmp_path / 'lavapipe'} is damaged ({driver}: truncated" in err


def test_vulkan_install_names_an_unwritable_folder(tmp_path, capsys):
    from sb3_elmur.envs import vulkan

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # (A file where a folder is needed: root ignores permission bits, so a read-only folder would not do.)
    assert vulkan.main(["install", "--dir", str(blocker / "lavapipe")]) == 1
    assert f"install failed: cannot write the install folder {blocker / 'lavapipe'}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() > 7, reason="this machine has cuda:7")
def test_a_missing_cuda_device_is_refused_not_replaced_by_the_cpu(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda:7' (asks for CUDA, which is not available|: this machine has)"):
        ElmurPPO("ElmurPolicy", RandomLengthEnv(spaces.Discrete(2)), device="cuda:7", policy_kwargs=SMALL)
    with pytest.raises(ValueError, match=r"device 'gpu' is not a torch device"):
        ElmurPPO("ElmurPolicy", RandomLengthEnv(spaces.Discrete(2)), device="gpu", policy_kwargs=SMALL)
    err = _compare_error(capsys, ["--envs", TMAZE, "--device", "cuda:7", "--out", str(tmp_path)])
    assert "--device 'cuda:7'" in err
    assert ElmurPPO("ElmurPolicy", RandomLengthEnv(spaces.Discrete(2)), device="cpu", policy_kwargs=SMALL).device.type == "cpu"
