"""Compare policies (ElmurPolicy, MlpLstmPolicy, plain MlpPolicy, ...) on the same env ids, budget and seeds.

    python -m sb3_elmur.compare --envs popgym-RepeatPreviousEasy-v0 sb3_elmur/PassiveTMaze-v0 \\
        --policies ElmurPolicy MlpLstmPolicy MlpPolicy --seeds 0 1 2 --timesteps 200000 --jobs 2 --out runs/compare

Every (env, policy, seed) run is a subprocess that writes one JSON file (settings, evaluation history, wall
time) and checkpoints its model at every evaluation point. A later invocation with the same settings skips the
finished runs and resumes the unfinished ones from their checkpoint, so a long comparison can be split across
sessions (``--time-budget`` stops cleanly). The markdown table, a JSON summary and a PNG of learning curves are
rebuilt from all run files at the end (``--report-only`` rebuilds them without training). Training logs go to
TensorBoard (``<out>/tensorboard``), with ELMUR's memory scalars for ELMUR policies.
"""

import argparse
import datetime
import fcntl
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from sb3_elmur.common.checks import check_device, check_int
from sb3_elmur.common.presets import TMAZE_LSTM_POLICY_KWARGS, TMAZE_POLICY_KWARGS, TMAZE_PPO_KWARGS
from sb3_elmur.common.utils import (
    algorithm_class,
    remove_leftover_temp_files,
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)
from sb3_elmur.common.utils import zip_problem as _zip_problem
from sb3_elmur.envs import mikasa_family
from sb3_elmur.envs.popgym import is_popgym_id

DEFAULT_POLICIES = ("ElmurPolicy", "MlpLstmPolicy")
# Shared PPO settings and per-policy defaults: the small, parameter-matched T-Maze pair of presets.py.
DEFAULT_PPO_KWARGS: Dict[str, Any] = dict(TMAZE_PPO_KWARGS)
DEFAULT_POLICY_KWARGS: Dict[str, Dict[str, Any]] = {
    "ElmurPolicy": dict(TMAZE_POLICY_KWARGS),
    "MlpLstmPolicy": dict(TMAZE_LSTM_POLICY_KWARGS),
}
POPGYM_WRAPPERS = ("sb3_elmur.envs.popgym.FlattenObservationWrapper", "sb3_elmur.envs.popgym.PreviousActionWrapper")
# Keys the comparison sets itself, so they cannot be given as PPO keyword arguments.
RESERVED_PPO_KWARGS = ("policy", "env", "seed", "policy_kwargs", "tensorboard_log", "verbose", "device", "_init_setup_model")
# Evaluation envs get other seeds than the training envs of the same run.
EVAL_SEED_OFFSET = 10_000
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# Algorithms a policy may name (ALGO:POLICY); without one, the policy's own: RecurrentPPO or PPO.
ALGORITHMS = ("ElmurPPO", "RecurrentPPO", "PPO")
FINISHED, UNFINISHED, FAILED, PENDING = "finished", "unfinished", "failed", "pending"
# The clock deadlines are checked against (one indirection, so that tests can stop a run at a chosen point).
_clock = time.time


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def resolve_policy(policy: str) -> Tuple[str, type]:
    """Algorithm and policy class for a policy alias or a dotted class path, optionally after an algorithm.

    :param policy: an alias of sb3-contrib's ``RecurrentPPO`` (``ElmurPolicy``, ``MlpLstmPolicy``, ...), of
        SB3's ``PPO`` (``MlpPolicy``, ...), or a dotted path to a policy class; ``ALGO:POLICY`` names the
        algorithm too (``ElmurPPO:ElmurPolicy``; ALGO one of ElmurPPO, RecurrentPPO, PPO)
    :return: ("ElmurPPO", "RecurrentPPO" or "PPO", policy class)
    """
    from sb3_contrib import RecurrentPPO
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from stable_baselines3 import PPO
    from stable_baselines3.common.policies import ActorCriticPolicy

    import sb3_elmur  # noqa: F401  (registers the ELMUR aliases)

    algo, sep, name = policy.rpartition(":")
    if sep:
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algo!r} in {policy!r}: expected one of {', '.join(ALGORITHMS)}")
        _, policy_class = resolve_policy(name)
        aliases = algorithm_class(algo).policy_aliases
        if name not in aliases and not issubclass(policy_class, tuple(aliases.values())):
            raise ValueError(f"{algo} does not take the policy {name!r}: it takes {sorted(aliases)}")
        if algo == "PPO" and issubclass(policy_class, RecurrentActorCriticPolicy):
            # A recurrent policy is an ActorCriticPolicy too, but PPO's rollouts keep no recurrent state: it would
            # fail only in the worker, at its first step.
            raise ValueError(
                f"PPO does not take the recurrent policy {name!r} (in {policy!r}): use RecurrentPPO:{name} or "
                f"ElmurPPO:{name}, or just {name}"
            )
        return algo, policy_class
    if policy in RecurrentPPO.policy_aliases:
        return "RecurrentPPO", RecurrentPPO.policy_aliases[policy]
    if policy in PPO.policy_aliases:
        return "PPO", PPO.policy_aliases[policy]
    if "." in policy:
        policy_class = _import_name(policy, "policy")
        if isinstance(policy_class, type) and issubclass(policy_class, RecurrentActorCriticPolicy):
            return "RecurrentPPO", policy_class
        if isinstance(policy_class, type) and issubclass(policy_class, ActorCriticPolicy):
            return "PPO", policy_class
        raise ValueError(f"policy {policy!r} is not an actor-critic policy class")
    raise ValueError(
        f"unknown policy {policy!r}: use a RecurrentPPO alias {sorted(RecurrentPPO.policy_aliases)}, "
        f"a PPO alias {sorted(PPO.policy_aliases)} or a dotted class path"
    )


def _import_name(dotted: str, what: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import the {what} {dotted!r}: {error}") from error


def resolve_classes(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Copy of policy keyword arguments where the dotted names given for ``*_fn`` / ``*_class`` keys (e.g.
    ``"activation_fn": "torch.nn.ReLU"``) are replaced by the objects they name (JSON cannot hold classes)."""
    resolved = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and (key.endswith("_fn") or key.endswith("_class")):
            value = _import_name(value, key)
        resolved[key] = value
    return resolved


def parse_assignments(items: Optional[Sequence[str]], option: str, parse_value: Callable[[str, str], Any]) -> Dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: parse_value(VALUE)}`` (for ``--policy-kwargs`` and co)."""
    result: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        result[key] = parse_value(value, f"{option} {key}")
    return result


def parse_json_dict(text: str, what: str) -> Dict[str, Any]:
    """Parse a JSON object, with an error that names the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: invalid JSON {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a JSON object, got {text!r}")
    return value


def parse_wrapper_list(text: str, what: str) -> List[Any]:
    """``"none"`` -> ``[]``; ``"a.B,c.D"`` -> ``["a.B", "c.D"]``."""
    if text.strip().lower() in ("", "none"):
        return []
    return [name.strip() for name in text.split(",") if name.strip()]


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a JSON or YAML comparison file (keys: the long options with ``_`` for ``-``)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from error
    if path.endswith((".yml", ".yaml")):
        try:
            import yaml
        except ImportError as error:
            raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml), or give a JSON file") from error
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: invalid YAML ({error})") from error
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config {path}: invalid JSON ({error}; a .yml or .yaml file is read as YAML)") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known keys: {sorted(CONFIG_KEYS)}")
    for key in LIST_KEYS:
        # A scalar would be iterated (``envs: CartPole-v1`` as its letters) or fail in list() (``seeds: 3``).
        if config.get(key) is not None and not isinstance(config[key], list):
            raise ValueError(f"{path}: {key} must be a list, e.g. {key}: [{config[key]}], got {config[key]!r}")
    for key in DICT_KEYS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{path}: {key} must be a mapping, got {config[key]!r}")
    return config


CONFIG_KEYS = (
    "envs",
    "policies",
    "seeds",
    "timesteps",
    "n_envs",
    "eval_freq",
    "eval_episodes",
    "stochastic_eval",
    "ppo_kwargs",
    "policy_kwargs",
    "env_kwargs",
    "wrappers",
    "gym_packages",
    "out",
    "jobs",
    "threads",
    "device",
    "elmur_scalars",
)


# Config keys whose value is a list (the options of nargs="+"), and those whose value is a mapping.
LIST_KEYS = ("envs", "policies", "seeds", "gym_packages")
DICT_KEYS = ("ppo_kwargs", "policy_kwargs", "env_kwargs", "wrappers")


def parse_policy_labels(policies: Sequence[str]) -> Dict[str, str]:
    """``["ElmurPolicy", "big=ElmurPolicy"]`` -> ``{"ElmurPolicy": "ElmurPolicy", "big": "ElmurPolicy"}``."""
    labels: Dict[str, str] = {}
    for item in policies:
        label, sep, policy = item.partition("=")
        if not sep:
            label, policy = item.replace(":", "-"), item
        if not LABEL_PATTERN.match(label):
            raise ValueError(f"policy label {label!r} may only hold letters, digits, '_', '.' and '-'")
        if label in labels:
            raise ValueError(f"policy label {label!r} is given twice (name them LABEL=POLICY)")
        labels[label] = policy
    return labels


def build_specs(settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One spec (JSON-able settings of one run) per env, policy label and seed.

    :param settings: envs, policies, seeds, timesteps, n_envs, eval_freq, eval_episodes, stochastic_eval,
        ppo_kwargs, policy_kwargs (label -> dict), env_kwargs (env -> dict), wrappers (env -> list),
        gym_packages
    :return: the run specs
    """
    envs = list(settings.get("envs") or [])
    if not envs:
        raise ValueError("no env ids: give --envs or a config file with 'envs'")
    if len(set(envs)) != len(envs):
        raise ValueError(f"env ids are given twice: {envs}")
    labels = parse_policy_labels(settings.get("policies") or DEFAULT_POLICIES)
    seeds = list(settings.get("seeds") or [0])
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds are given twice: {seeds}")
    timesteps = check_int("timesteps", settings.get("timesteps", 100_000))
    n_envs = check_int("n_envs", settings.get("n_envs", 8))
    eval_freq = check_int("eval_freq", settings.get("eval_freq") or max(1, timesteps // 10))
    eval_episodes = check_int("eval_episodes", settings.get("eval_episodes", 20))

    ppo_kwargs = {**DEFAULT_PPO_KWARGS, **(settings.get("ppo_kwargs") or {})}
    policy_kwargs = dict(settings.get("policy_kwargs") or {})
    env_kwargs = dict(settings.get("env_kwargs") or {})
    wrappers = dict(settings.get("wrappers") or {})
    for option, given, known in (
        ("policy kwargs", policy_kwargs, labels),
        ("env kwargs", env_kwargs, envs),
        ("wrappers", wrappers, envs),
    ):
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"{option} given for {sorted(unknown)}, which are not among {sorted(known)}")
    reserved = set(ppo_kwargs) & set(RESERVED_PPO_KWARGS)
    if reserved:
        raise ValueError(f"PPO kwargs {sorted(reserved)} are set by the comparison itself (use the options)")

    algos = {label: resolve_policy(policy)[0] for label, policy in labels.items()}
    for algo in set(algos.values()):
        accepted = set(inspect.signature(algorithm_class(algo).__init__).parameters)
        unknown = set(ppo_kwargs) - accepted
        if unknown:
            raise ValueError(f"unknown {algo} keyword argument(s) {sorted(unknown)} in the PPO kwargs")
    for label, kwargs in policy_kwargs.items():
        if not isinstance(kwargs, dict):
            raise ValueError(f"policy kwargs of {label!r} must be a mapping, got {kwargs!r}")
        resolve_classes(kwargs)  # fail early on names that do not import
    for env_id, kwargs in env_kwargs.items():
        if not isinstance(kwargs, dict):
            raise ValueError(f"env kwargs of {env_id!r} must be a mapping, got {kwargs!r}")
    for env_id, names in wrappers.items():
        if not isinstance(names, list):
            raise ValueError(f"wrappers of {env_id!r} must be a list of names, got {names!r}")
        make_wrapper_fn(names)  # fail early on names that do not import

    specs = []
    for env_id in envs:
        env_wrappers = wrappers.get(env_id, list(POPGYM_WRAPPERS) if is_popgym_id(env_id) else [])
        for label, policy in labels.items():
            kwargs = {**DEFAULT_POLICY_KWARGS.get(policy.rpartition(":")[2], {}), **policy_kwargs.get(label, {})}
            for seed in seeds:
                specs.append(
                    dict(
                        env_id=env_id,
                        label=label,
                        policy=policy,
                        algo=algos[label],
                        seed=int(seed),
                        timesteps=timesteps,
                        n_envs=n_envs,
                        eval_freq=eval_freq,
                        eval_episodes=eval_episodes,
                        deterministic_eval=not settings.get("stochastic_eval", False),
                        ppo_kwargs=ppo_kwargs,
                        policy_kwargs=kwargs,
                        env_kwargs=env_kwargs.get(env_id, {}),
                        wrappers=env_wrappers,
                        gym_packages=list(settings.get("gym_packages") or []),
                    )
                )
    return _normalise(specs)


def _normalise(value: Any) -> Any:
    """JSON round trip, so that specs compare equal to what was written to disk."""
    return json.loads(json.dumps(value, sort_keys=True))


def env_slug(env_id: str) -> str:
    """Folder name of an env id (``sb3_elmur/TMaze-v0`` -> ``sb3_elmur-TMaze-v0``)."""
    return env_id.replace("/", "-").replace(":", "-")


class RunPaths:
    """Where one run keeps its files.

    :param out: output folder of the comparison
    :param spec: the run's spec
    """

    def __init__(self, out: Path, spec: Dict[str, Any]) -> None:
        folder = Path(out) / "runs" / env_slug(spec["env_id"]) / spec["label"]
        stem = f"seed{spec['seed']}"
        self.record = folder / f"{stem}.json"
        self.lock = folder / f"{stem}.lock"
        self.log = folder / f"{stem}.log"
        self.checkpoint = folder / f"{stem}_checkpoint.zip"
        self.model = folder / f"{stem}_model.zip"
        self.tensorboard = Path(out) / "tensorboard" / env_slug(spec["env_id"])
        self.tb_log_name = f"{spec['label']}_seed{spec['seed']}"


def read_record(path: Path) -> Dict[str, Any]:
    """The JSON record of a run, with an error naming the file if it cannot be read."""
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the run record {path} ({error}); delete it to redo the run") from error
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "status" not in record:
        raise ValueError(f"{path} is not a run record of sb3_elmur.compare; delete it to redo the run")
    # The report reads these: a record without them (edited, or cut by hand) is named, not a KeyError there.
    evaluations = record.get("evaluations")
    missing = [key for key in ("timesteps", "mean_return") if not isinstance(evaluations, dict)
               or not isinstance(evaluations.get(key), list)]
    missing += [key for key in ("env_id", "label", "policy", "algo", "seed", "timesteps", "eval_freq")
                if key not in record["spec"]]
    if record["status"] == FINISHED:
        missing += [key for key in ("final_mean_return", "mmer", "mmer_normalised", "wall_time_s") if key not in record]
    if missing:
        raise ValueError(
            f"the run record {path} lacks {', '.join(missing)} (evaluations.timesteps and evaluations.mean_return are "
            "lists in every record); delete it to redo the run"
        )
    return record


def record_paths_in(out: Path) -> List[Path]:
    """The run records in the output folder ``out`` (of this and earlier invocations)."""
    return sorted((Path(out) / "runs").glob("*/*/seed*.json"))


class RunLock:
    """Exclusive ``flock`` of one run, so that two invocations never train the same run at once. The operating
    system releases it when the last process holding it exits (a worker inherits its launcher's lock), so a
    killed invocation never leaves a stale lock. The lock file holds the holder's pid, host and start time, and is
    removed on release (unless a worker may still share the lock); a file that a killed holder left is taken over.

    :param path: the lock file (beside the run's record)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock without waiting. :return: whether it was taken (False: another process holds it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # A holder removes the file before it unlocks (release): a lock on a file no longer at the path locks
            # nothing that others see, so open the current one again (as utils.exclusive_lock does).
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        holder = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            command=" ".join(sys.argv),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it in the lock file."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, since {holder['started']} ({holder['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            # The holder has not written its details yet (or the file is not ours).
            return f"an unknown process (lock file {self.path})"

    def release(self, remove: bool = True) -> None:
        """Release the lock (if held).

        :param remove: remove the lock file too (still locked, so that a process that opened it meanwhile finds it
            gone and opens a new one). Pass False while a worker that shares the lock may still run: its lock must
            stay on the file that others open.
        """
        if self.fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def new_record(spec: Dict[str, Any], options: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        spec=spec,
        options=options,
        status=PENDING,
        num_timesteps=0,
        evaluations=dict(timesteps=[], mean_return=[], std_return=[], mean_length=[]),
        wall_time_s=0.0,
        eval_time_s=0.0,
        sessions=0,
    )


def _spec_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


# ----------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ----------------------------------------------------------------------------------------------------------


def make_wrapper_fn(names: Sequence[Any]) -> Optional[Callable]:
    """A function applying the wrappers named in ``names`` (dotted names, or ``{name: kwargs}``) in order."""
    if not names:
        return None
    classes = []
    for entry in names:
        if isinstance(entry, dict):
            if len(entry) != 1:
                raise ValueError(f"a wrapper with arguments is written {{name: kwargs}}, got {entry!r}")
            name, kwargs = next(iter(entry.items()))
        else:
            name, kwargs = entry, {}
        classes.append((_import_name(name, "wrapper"), dict(kwargs or {})))

    def wrap(env: Any) -> Any:
        for wrapper_class, kwargs in classes:
            env = wrapper_class(env, **kwargs)
        return env

    return wrap


def make_env(spec: Dict[str, Any], n_envs: int, seed: int) -> Any:
    """The run's vectorized env: ``gym.make`` (no render mode forced), Monitor, then the spec's wrappers."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_elmur  # noqa: F401  (registers the T-Maze ids)
    from sb3_elmur.envs.popgym import _import_popgym

    for module in spec["gym_packages"]:
        importlib.import_module(module)
    if is_popgym_id(spec["env_id"]):
        _import_popgym()
    if mikasa_family(spec["env_id"]) is not None:  # batched simulation: the adapter is the VecEnv, with episode statistics
        from sb3_elmur.envs.maniskill import ManiSkillVecEnv

        if spec["wrappers"]:
            raise ValueError(f"{spec['env_id']} runs as a ManiSkillVecEnv, which takes no gym wrappers")
        return ManiSkillVecEnv(spec["env_id"], n_envs=n_envs, seed=seed, **spec["env_kwargs"])
    # A callable, not the id: make_vec_env would add render_mode="rgb_array", which some envs reject.
    return make_vec_env(
        functools.partial(gym.make, spec["env_id"]),
        n_envs=n_envs,
        seed=seed,
        env_kwargs=spec["env_kwargs"],
        wrapper_class=make_wrapper_fn(spec["wrappers"]),
    )


def _build_evaluator(
    eval_env: Any, spec: Dict[str, Any], record: Dict[str, Any], on_eval: Callable, deadline: Optional[float]
) -> Any:
    """The callback that evaluates (and then calls ``on_eval(model)``) and stops at the deadline."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    class Evaluator(BaseCallback):
        """Evaluates (and checkpoints) at rollout starts, when the policy has been trained on exactly
        ``num_timesteps`` steps, once per ``eval_freq`` steps; stops training after the deadline."""

        def __init__(self) -> None:
            super().__init__()
            self.stopped = False
            self.trained_timesteps = 0

        def next_evaluation(self) -> int:
            done = record["evaluations"]["timesteps"]
            return 0 if not done else (done[-1] // spec["eval_freq"] + 1) * spec["eval_freq"]

        def evaluate(self) -> None:
            start = time.perf_counter()
            successes: List[bool] = []

            def record_success(local_vars: Dict[str, Any], _: Any) -> None:
                if local_vars["done"] and local_vars["info"].get("is_success") is not None:
                    successes.append(bool(local_vars["info"]["is_success"]))

            returns, lengths = evaluate_policy(
                self.model,
                eval_env,
                n_eval_episodes=spec["eval_episodes"],
                deterministic=spec["deterministic_eval"],
                return_episode_rewards=True,
                warn=False,
                callback=record_success,
            )
            history = record["evaluations"]
            # The success rate of envs that report is_success (records written before it was kept: None)
            history.setdefault("success_rate", [None] * len(history["timesteps"]))
            history["success_rate"].append(float(np.mean(successes)) if successes else None)
            history["timesteps"].append(int(self.model.num_timesteps))
            history["mean_return"].append(float(np.mean(returns)))
            history["std_return"].append(float(np.std(returns)))
            history["mean_length"].append(float(np.mean(lengths)))
            record["eval_time_s"] += time.perf_counter() - start
            self.logger.record("eval/mean_return", history["mean_return"][-1])
            self.logger.record("eval/mmer", max(history["mean_return"]))
            self.logger.record("eval/mean_length", history["mean_length"][-1])
            self.logger.dump(self.model.num_timesteps)
            print(
                f"{spec['env_id']} {spec['label']} seed {spec['seed']}: step {self.model.num_timesteps}, "
                f"mean return {history['mean_return'][-1]:.3f}",
                flush=True,
            )

        def _on_rollout_start(self) -> None:
            if self.model.num_timesteps >= self.next_evaluation():
                self.evaluate()
                on_eval(self.model)
            if deadline is not None and _clock() > deadline:
                # Training stops at the next step; the policy has been trained on this many steps.
                self.stopped = True
                self.trained_timesteps = int(self.model.num_timesteps)

        def _on_step(self) -> bool:
            return not self.stopped

    return Evaluator()


def run_worker(record_path: Path, deadline: Optional[float] = None, lock_fd: Optional[int] = None) -> int:
    """Train and evaluate one run (resuming from its checkpoint if any), updating its JSON file.

    :param record_path: the run's JSON file (holds its spec)
    :param deadline: stop training cleanly (checkpoint, status "unfinished") after this Unix time
    :param lock_fd: the run's lock, inherited from the launching process; None: take it here
    :return: process exit code (2: the run is locked by another process, or finished already)
    """
    record_path = Path(record_path)
    if lock_fd is not None:
        return _train_run(record_path, deadline)
    lock = RunLock(record_path.with_suffix(".lock"))
    if not lock.acquire():
        print(f"{record_path} is locked by {lock.holder()}: not running it", file=sys.stderr, flush=True)
        return 2
    try:
        return _train_run(record_path, deadline)
    finally:
        lock.release()


def _train_run(record_path: Path, deadline: Optional[float]) -> int:
    """:func:`run_worker`, with the run's lock held."""
    record = read_record(record_path)
    if record["status"] == FINISHED:
        print(f"{record_path} is finished already: not running it", file=sys.stderr, flush=True)
        return 2
    spec, options = record["spec"], record["options"]
    paths = RunPaths(record_path.parents[3], spec)
    for path in (paths.record, paths.checkpoint, paths.model):
        for leftover in remove_leftover_temp_files(path):
            print(f"removed {leftover}, left by a write that was interrupted", flush=True)
    worker_start = time.perf_counter()
    previous_wall_time = record["wall_time_s"]
    record["sessions"] += 1
    record.pop("error", None)

    def save_progress(model: Any, status: str) -> None:
        record["status"] = status
        record["num_timesteps"] = int(model.num_timesteps)
        record["wall_time_s"] = previous_wall_time + time.perf_counter() - worker_start
        write_json_atomically(record_path, record)

    try:
        import torch

        torch.set_num_threads(options["threads"])
        from sb3_elmur.common.callbacks import ElmurTensorboardCallback
        from sb3_elmur.common.policies import ElmurPolicy

        algo = algorithm_class(spec["algo"])
        _, policy_class = resolve_policy(spec["policy"])
        env = make_env(spec, spec["n_envs"], spec["seed"])
        eval_env = make_env(spec, min(spec["n_envs"], spec["eval_episodes"]), spec["seed"] + EVAL_SEED_OFFSET)
        model = load_checkpoint(algo, paths.checkpoint, record, env, options["device"])
        resumed = model is not None
        if resumed:
            # The saved last observation belongs to the old env instances: start new episodes instead.
            model._last_obs = None
            # New seeds for the new session's randomness (a resumed run is not bit-identical to an uninterrupted one).
            model.set_random_seed(spec["seed"] + 1000 * record["sessions"])
            print(f"resuming from {paths.checkpoint} at step {model.num_timesteps}", flush=True)
        else:
            record["evaluations"] = new_record(spec, options)["evaluations"]
            record["wall_time_s"] = record["eval_time_s"] = previous_wall_time = 0.0
            model = algo(
                policy_class,
                env,
                seed=spec["seed"],
                policy_kwargs=resolve_classes(spec["policy_kwargs"]),
                tensorboard_log=str(paths.tensorboard) if _has_module("tensorboard") else None,
                verbose=0,
                device=options["device"],
                **spec["ppo_kwargs"],
            )
        record["n_parameters"] = int(sum(p.numel() for p in model.policy.parameters()))
        record["versions"] = _versions()

        def checkpoint(model: Any) -> None:
            # The previous checkpoint stays in place until the new one is complete.
            write_atomically(paths.checkpoint, model.save)
            save_progress(model, UNFINISHED)

        evaluator = _build_evaluator(eval_env, spec, record, checkpoint, deadline)
        callbacks = [evaluator]
        if options["elmur_scalars"] and issubclass(policy_class, ElmurPolicy):
            callbacks.append(ElmurTensorboardCallback())
        # Also called when nothing is left to learn (a session that ended between its last update and the end of
        # its run): learn() then only sets up the logger and callbacks that the final evaluation uses.
        model.learn(
            max(spec["timesteps"] - model.num_timesteps, 0),
            callback=callbacks,
            tb_log_name=paths.tb_log_name,
            reset_num_timesteps=not resumed,
            log_interval=1,
        )
        if evaluator.stopped:
            # The one step taken after the stop was never trained on (and its envs are gone): not counted.
            model.num_timesteps = evaluator.trained_timesteps
            checkpoint(model)
            print(f"stopped at step {model.num_timesteps} (time budget): resume with the same command", flush=True)
            return 0
        if not record["evaluations"]["timesteps"] or record["evaluations"]["timesteps"][-1] < model.num_timesteps:
            evaluator.evaluate()
        record.update(run_scores(record["evaluations"]["mean_return"]))
        write_atomically(paths.model, model.save)
        save_progress(model, FINISHED)
        paths.checkpoint.unlink(missing_ok=True)
        env.close()
        eval_env.close()
        return 0
    except Exception:
        record["status"] = FAILED
        record["error"] = traceback.format_exc()[-4000:]
        record["wall_time_s"] = previous_wall_time + time.perf_counter() - worker_start
        write_json_atomically(record_path, record)
        traceback.print_exc()
        return 1


def check_runs(specs: List[Dict[str, Any]]) -> None:
    """Set up every env and algorithm of ``specs`` once, in this process, before any worker starts: an unknown env
    id, a bad env kwarg or a bad PPO or policy kwarg value would otherwise fail each run in its worker, named only
    in the run's log. MIKASA-Robo and ManiSkill ids are left to their workers (each starts a simulator).

    :param specs: the specs of the runs about to be launched
    :raises ValueError: the first that cannot be set up, naming the env, the label and the error
    """
    checked = set()
    for spec in specs:
        key = json.dumps([spec["env_id"], spec["label"], spec["env_kwargs"], spec["wrappers"], spec["policy_kwargs"],
                          spec["ppo_kwargs"], spec["n_envs"]], sort_keys=True)
        if key in checked or mikasa_family(spec["env_id"]) is not None:
            continue
        checked.add(key)
        try:
            env = make_env(spec, spec["n_envs"], spec["seed"])
        except Exception as error:
            raise ValueError(
                f"cannot make the env {spec['env_id']!r} with env kwargs {spec['env_kwargs']} and wrappers "
                f"{spec['wrappers']} ({type(error).__name__}: {error}); check --envs, --env-kwargs, --wrappers and "
                "--gym-packages"
            ) from error
        try:
            _, policy_class = resolve_policy(spec["policy"])
            algorithm_class(spec["algo"])(policy_class, env, policy_kwargs=resolve_classes(spec["policy_kwargs"]),
                                          device="cpu", **spec["ppo_kwargs"])
        except Exception as error:
            raise ValueError(
                f"cannot set up {spec['algo']} with the policy {spec['label']}={spec['policy']} on {spec['env_id']!r} "
                f"(PPO kwargs {spec['ppo_kwargs']}, policy kwargs {spec['policy_kwargs']}): "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            env.close()


def load_checkpoint(algo: type, checkpoint: Path, record: Dict[str, Any], env: Any, device: str) -> Optional[Any]:
    """The run's model from its checkpoint, or None (with a log line saying why) to start the run from step 0.

    A checkpoint that cannot be loaded (e.g. one written in place by an older version and cut short by a kill), or
    that holds a model of another configuration than the run's spec (another policy, policy or PPO keyword
    arguments: its run would "finish" with the wrong model), is renamed ``*.broken`` (kept for inspection) rather
    than failing every later session of the run or being trained on.

    :param algo: the algorithm class
    :param checkpoint: the run's checkpoint file
    :param record: the run's record (``num_timesteps`` says whether an earlier session made progress)
    :param env: the training env to attach
    :param device: torch device
    :return: the loaded model, or None
    """
    if record["num_timesteps"] == 0:
        return None
    if not checkpoint.exists():
        print(f"no checkpoint {checkpoint} for step {record['num_timesteps']}: restarting the run from step 0", flush=True)
        return None
    problem = _zip_problem(checkpoint)
    model = None
    if problem is None:
        # Other errors (e.g. a bad --device) are not the checkpoint's fault: they fail the run, checkpoint kept.
        model = algo.load(checkpoint, env=env, device=device)
        problem = _configuration_mismatch(model, record["spec"])
    if problem is not None:
        broken = checkpoint.with_name(checkpoint.name + ".broken")
        os.replace(checkpoint, broken)
        verb = "cannot load" if model is None else "cannot resume from"
        print(f"{verb} the checkpoint {checkpoint} ({problem}): kept as {broken}, restarting the run from step 0",
              flush=True)
        return None
    return model


def _configuration_mismatch(model: Any, spec: Dict[str, Any]) -> Optional[str]:
    """How the configuration of a loaded checkpoint differs from the run's spec (``load`` builds the model the zip
    describes, whatever the spec says), or None if it does not.

    :param model: the model loaded from the checkpoint
    :param spec: the run's spec
    :return: the differences, naming each setting with the checkpoint's and the spec's value
    """
    differences = []
    _, policy_class = resolve_policy(spec["policy"])
    if type(model.policy) is not policy_class:
        differences.append(f"policy {type(model.policy).__name__} against {policy_class.__name__}")
    expected = resolve_classes(spec["policy_kwargs"])
    saved = dict(model.policy_kwargs or {})
    for key in sorted(set(expected) | set(saved)):
        if saved.get(key, "(unset)") != expected.get(key, "(unset)"):
            differences.append(f"policy_kwargs {key}={saved.get(key, '(unset)')!r} against {expected.get(key, '(unset)')!r}")
    for key, value in sorted(spec["ppo_kwargs"].items()):
        # Plain values only: the algorithm turns some (clip_range, ...) into schedules when it sets up.
        saved_value = getattr(model, key, None)
        if isinstance(saved_value, (bool, int, float, str)) and saved_value != value:
            differences.append(f"{key}={saved_value!r} against {value!r}")
    if not differences:
        return None
    return "a model of another configuration, the checkpoint's against the run's: " + ", ".join(differences)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_scores(mean_returns: Sequence[float]) -> Dict[str, float]:
    """Scores of one run from its evaluation history.

    :param mean_returns: mean evaluation return at each evaluation point, in order
    :return: ``final_mean_return`` (the last one), ``mmer`` (POPGym's MMER: the maximum over evaluation points,
        i.e. the final value of their running maximum) and ``mmer_normalised`` (0.5 * MMER + 0.5, POPGym's score
        for returns in [-1, 1])
    """
    if len(mean_returns) == 0:
        raise ValueError("a run without evaluations has no score")
    mmer = float(max(mean_returns))
    return dict(final_mean_return=float(mean_returns[-1]), mmer=mmer, mmer_normalised=0.5 * mmer + 0.5)


def _versions() -> Dict[str, str]:
    import sb3_contrib
    import stable_baselines3
    import torch

    import sb3_elmur

    return {
        "sb3_elmur": sb3_elmur.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "sb3_contrib": sb3_contrib.__version__,
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------


class PreparedRuns(NamedTuple):
    """What :func:`prepare_runs` found: the runs to launch (their locks held), and those to leave alone."""

    to_run: List[Path]
    finished: List[Path]
    busy: List[str]  # "<record> (locked by <holder>)", runs that another process is running
    locks: Dict[Path, RunLock]  # record path -> its lock, held for the runs to launch

    def release(self) -> None:
        for lock in self.locks.values():
            lock.release()


def prepare_runs(out: Path, specs: List[Dict[str, Any]], options: Dict[str, Any]) -> PreparedRuns:
    """Create or check the run files and lock the runs to launch.

    Finished runs are skipped, and so are runs locked by another process (another invocation on the same
    ``out``), which would otherwise be trained twice at once.

    :param out: output folder of the comparison
    :param specs: the run specs (:func:`build_specs`)
    :param options: the runs' process options (threads, device, elmur_scalars)
    :return: the runs to launch (locked, until :meth:`PreparedRuns.release` or the process ends), the finished
        ones and the busy ones
    """
    conflicts = []
    for spec in specs:
        paths = RunPaths(out, spec)
        if paths.record.exists():
            differences = _spec_differences(read_record(paths.record)["spec"], spec)
            if differences:
                conflicts.append(f"{paths.record} (differs in {', '.join(differences)})")
    if conflicts:
        raise ValueError(
            "these runs exist with other settings; use another --out or delete them:\n  " + "\n  ".join(conflicts)
        )
    prepared = PreparedRuns([], [], [], {})
    try:
        for spec in specs:
            paths = RunPaths(out, spec)
            lock = RunLock(paths.lock)
            if not lock.acquire():
                prepared.busy.append(f"{paths.record} (locked by {lock.holder()})")
                continue
            prepared.locks[paths.record] = lock
            # Read under the lock: another process may have finished the run since.
            if paths.record.exists():
                record = read_record(paths.record)
                if record["status"] == FINISHED:
                    prepared.locks.pop(paths.record).release()
                    prepared.finished.append(paths.record)
                    continue
                record["options"] = options
            else:
                record = new_record(spec, options)
            write_json_atomically(paths.record, record)
            prepared.to_run.append(paths.record)
    except BaseException:
        prepared.release()
        raise
    return prepared


def run_name(spec: Dict[str, Any]) -> str:
    """How the console names a run: ``"sb3_elmur/PassiveTMaze-v0 ElmurPolicy seed 0"``."""
    return f"{spec['env_id']} {spec['label']} seed {spec['seed']}"


class _Running(NamedTuple):
    """A launched worker, and what the console has said of it."""

    process: subprocess.Popen
    path: Path
    log: Any
    tag: str  # "[2/6] <run name>"
    timesteps: int  # the run's budget of env steps
    evaluations_shown: List[int]  # one element: how many of its evaluations the console has shown
    record_mtime: List[int]  # one element: the record's mtime when last read


def _evaluations_in(path: Path) -> List[Tuple[int, float]]:
    """The (step, mean return) evaluations in the record ``path`` (none if it cannot be read now)."""
    try:
        evaluations = read_record(path)["evaluations"]
    except ValueError:
        return []
    return list(zip(evaluations["timesteps"], evaluations["mean_return"]))


def _show_progress(run: _Running) -> None:
    """Print the evaluations a running worker has added to its record since the last look: one line each."""
    try:
        mtime = run.path.stat().st_mtime_ns
    except OSError:
        return
    if mtime == run.record_mtime[0]:
        return
    run.record_mtime[0] = mtime
    evaluations = _evaluations_in(run.path)
    run.evaluations_shown[0] = min(run.evaluations_shown[0], len(evaluations))  # a run restarted from step 0
    for step, mean_return in evaluations[run.evaluations_shown[0]:]:
        print(f"{run.tag}: step {step:,}/{run.timesteps:,}, mean return {mean_return:.3f}", flush=True)
    run.evaluations_shown[0] = len(evaluations)


def _outcome(path: Path, returncode: int) -> Tuple[str, bool]:
    """The console's line on a worker that ended (after its tag), and whether the run failed."""
    log = path.with_suffix(".log")
    try:
        record = read_record(path)
    except ValueError as error:
        return f"FAILED (exit code {returncode}): {error} (log: {log})", True
    status = record["status"]
    if status == FINISHED and returncode == 0:
        success = (record["evaluations"].get("success_rate") or [None])[-1]
        return (f"finished in {record['wall_time_s']:.0f} s: final mean return {record['final_mean_return']:.3f}, "
                f"MMER {record['mmer']:.3f}" + (f", success {success:.2f}" if success is not None else ""), False)
    if status == UNFINISHED and returncode == 0:
        return (f"stopped at step {record['num_timesteps']:,} of {record['spec']['timesteps']:,} (time budget): the "
                "same command resumes it", False)
    error_lines = [line for line in str(record.get("error", "")).splitlines() if line.strip()]
    why = f": {error_lines[-1].strip()}" if error_lines else ""
    return f"FAILED ({status}, exit code {returncode}){why} (log: {log})", True


def launch_runs(
    record_paths: List[Path], jobs: int, deadline: Optional[float], locks: Optional[Dict[Path, RunLock]] = None
) -> List[Path]:
    """Run the workers, ``jobs`` at a time. The console gets one line when a run starts, one per evaluation (read
    from its record) and one when it ends, with its scores or why it failed; the rest of a worker's output goes to
    its log.

    :param record_paths: the runs
    :param jobs: how many at a time
    :param deadline: Unix time after which no run starts and the running ones stop cleanly
    :param locks: the runs' locks (record path -> lock), handed down to their workers and released (their files
        removed) when they end
    :return: the record paths of runs that failed
    """
    locks = locks or {}
    pending = list(enumerate(record_paths, 1))
    running: List[_Running] = []
    failed = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        while pending or running:
            while pending and len(running) < jobs and (deadline is None or _clock() < deadline):
                number, path = pending.pop(0)
                log = open(path.with_suffix(".log"), "a")
                command = [sys.executable, "-m", "sb3_elmur.compare", "--worker", str(path)]
                if deadline is not None:
                    command += ["--deadline", repr(deadline)]
                lock = locks.get(path)
                if lock is not None and lock.fd is not None:
                    # The worker shares the lock: it stays held if this process is killed while the worker trains.
                    command += ["--lock-fd", str(lock.fd)]
                pass_fds = [lock.fd] if lock is not None and lock.fd is not None else []
                spec = read_record(path)["spec"]
                tag = f"[{number}/{len(record_paths)}] {run_name(spec)}"
                print(f"{tag}: start (log: {path.with_suffix('.log')})", flush=True)
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
                shown = len(_evaluations_in(path))  # a resumed run's earlier evaluations were shown in their session
                running.append(_Running(process, path, log, tag, int(spec["timesteps"]), [shown], [0]))
            if deadline is not None and _clock() >= deadline and pending:
                print(f"time budget spent: {len(pending)} run(s) not started", flush=True)
                pending.clear()
            still_running = []
            for run in running:
                if run.process.poll() is None:
                    _show_progress(run)
                    still_running.append(run)
                    continue
                run.log.close()
                if run.path in locks:
                    locks[run.path].release()  # the worker has ended: its lock file goes too
                _show_progress(run)
                line, run_failed = _outcome(run.path, run.process.returncode)
                print(f"{run.tag}: {line}", flush=True)
                if run_failed:
                    failed.append(run.path)
            running = still_running
            if running:
                time.sleep(0.2)
    finally:
        # Interrupted (Ctrl-C, an error here): a worker still running shares its run's lock, so the lock file stays
        # where others open it. (Those that ended are released, their files removed, by the caller.)
        for run in running:
            if run.process.poll() is None and run.path in locks:
                locks[run.path].release(remove=False)
            run.log.close()
    return failed


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def group_records(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str], List[Dict[str, Any]]]:
    """Records by env id, policy label and all other settings but the seed: runs with other settings (e.g. of
    other invocations on the same ``--out``) are never averaged together."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for record in records:
        spec = record["spec"]
        settings = json.dumps({key: value for key, value in spec.items() if key != "seed"}, sort_keys=True)
        groups.setdefault((spec["env_id"], spec["label"], settings), []).append(record)
    return groups


def summarize(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per :func:`group_records` group (env, policy label and settings): mean and std over finished seeds
    of the final mean return, the MMER, the normalised MMER and the wall time per seed; failed seeds are counted
    apart (``seeds_failed``), never scored."""
    rows = []
    for (env_id, label, _), group in group_records(records).items():
        done = [r for r in group if r["status"] == FINISHED]
        row: Dict[str, Any] = dict(
            env_id=env_id,
            label=label,
            policy=group[0]["spec"]["policy"],
            algo=group[0]["spec"]["algo"],
            timesteps=group[0]["spec"]["timesteps"],
            seeds=sorted(r["spec"]["seed"] for r in group),
            seeds_finished=len(done),
            seeds_failed=sum(r["status"] == FAILED for r in group),
            seeds_total=len(group),
            n_parameters=group[0].get("n_parameters"),
        )
        if done:
            for key in ("final_mean_return", "mmer", "mmer_normalised", "wall_time_s"):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in done])
            final_success = [(r["evaluations"].get("success_rate") or [None])[-1] for r in done]
            if None not in final_success:
                row["final_success"], row["final_success_std"] = _mean_std(final_success)
        rows.append(row)
    return rows


def _fmt(row: Dict[str, Any], key: str, digits: int = 3, unit: str = "") -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}{unit}"


def evaluation_schedule(records: List[Dict[str, Any]]) -> str:
    """When the runs were evaluated, read from their evaluation steps (evaluations wait for a rollout boundary,
    so the real interval is a multiple of the rollout size, not ``--eval-freq`` itself).

    :param records: run records with the same evaluation settings
    :return: e.g. ``"at step 0, every 1,024 steps and at the end"``
    """
    intervals = set()
    for record in records:
        steps = record["evaluations"]["timesteps"]
        if record["status"] == FINISHED:
            steps = steps[:-1]  # the evaluation at the end is off the schedule
        intervals.update(int(b - a) for a, b in zip(steps, steps[1:]))
    eval_freq = records[0]["spec"]["eval_freq"]
    if not intervals:
        return f"at step 0, at the first rollout boundary after every {eval_freq:,} steps and at the end"
    low, high = min(intervals), max(intervals)
    every = f"every {low:,} steps" if low == high else f"every {low:,} to {high:,} steps"
    if intervals != {eval_freq}:
        every += f" (--eval-freq {eval_freq:,}, rounded up to rollout boundaries)"
    return f"at step 0, {every} and at the end"


def _section_settings(spec: Dict[str, Any]) -> str:
    """The settings a table section states (runs that differ in them go to separate sections)."""
    keys = ("timesteps", "n_envs", "eval_freq", "eval_episodes", "deterministic_eval", "env_kwargs", "wrappers")
    return json.dumps([spec.get(key) for key in keys] + [spec.get("ppo_kwargs", {}).get("n_steps")], sort_keys=True)


def write_table(records: List[Dict[str, Any]], path: Path) -> str:
    """Markdown table of the :func:`summarize` rows of ``records``, one section per env and settings.

    :return: the markdown
    """
    lines = [
        "# Policy comparison",
        "",
        "Mean ± std (population std, over the finished seeds) of: the final mean evaluation return; the MMER, the "
        "maximum over evaluation points of the mean evaluation return; POPGym's normalised score 0.5 * MMER + 0.5 "
        "(meaningful for returns in [-1, 1]); the final success rate, for envs that report `is_success`; and the wall "
        "time of one seed's run (training and evaluations). Failed runs are counted in the seeds column, left out of "
        "the scores and curves, and listed at the end.",
    ]
    sections: Dict[Tuple[str, str], List[Tuple[Dict[str, Any], List[Dict[str, Any]]]]] = {}
    for row, group in zip(summarize(records), group_records(records).values()):
        sections.setdefault((row["env_id"], _section_settings(group[0]["spec"])), []).append((row, group))
    for (env_id, _), section in sections.items():
        section_records = [record for _, group in section for record in group]
        spec = section_records[0]["spec"]
        mode = "deterministic" if spec["deterministic_eval"] else "stochastic"
        lines += [
            "",
            f"## {env_id}",
            "",
            f"{spec['timesteps']:,} env steps per run, {spec['n_envs']} envs; {spec['eval_episodes']} {mode} "
            f"evaluation episodes {evaluation_schedule(section_records)}. "
            f"Env kwargs: {json.dumps(spec['env_kwargs'])}; "
            f"wrappers: {', '.join(str(w) for w in spec['wrappers']) or 'none'}.",
            "",
            "| policy | algorithm | parameters | seeds | final return | MMER | normalised MMER | final success | "
            "wall time / seed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row, _ in section:
            name = row["label"] if row["label"] == row["policy"] else f"{row['label']} ({row['policy']})"
            parameters = f"{row['n_parameters']:,}" if row["n_parameters"] else "-"
            seeds = f"{row['seeds_finished']}/{row['seeds_total']}"
            if row["seeds_failed"]:
                seeds += f" ({row['seeds_failed']} failed)"
            lines.append(
                f"| {name} | {row['algo']} | {parameters} | {seeds} | "
                f"{_fmt(row, 'final_mean_return')} | {_fmt(row, 'mmer')} | {_fmt(row, 'mmer_normalised')} | "
                f"{_fmt(row, 'final_success', 2)} | {_fmt(row, 'wall_time_s', 1, ' s')} |"
            )
    failed = [record for record in records if record["status"] == FAILED]
    if failed:
        lines += ["", "## Failed runs", "", "Left out of the scores and curves; their logs say why (a later invocation "
                  "with the same settings runs them again):", ""]
        for record in failed:
            error = [line for line in str(record.get("error", "")).splitlines() if line.strip()]
            log = RunPaths(Path(), record["spec"]).log
            lines.append(f"- {run_name(record['spec'])}: {error[-1].strip() if error else 'no error recorded'} ({log})")
    text = "\n".join(lines) + "\n"
    write_text_atomically(path, text)
    return text


def curve_label(label: str, n_seeds: int) -> str:
    """Legend entry of a learning curve: ``"ElmurPolicy (1 seed)"``, ``"ElmurPolicy (3 seeds)"``."""
    return f"{label} ({n_seeds} seed{'' if n_seeds == 1 else 's'})"


CURVES = {"mean_return": "mean evaluation return", "success_rate": "evaluation success rate"}


def plot_curves(records: List[Dict[str, Any]], path: Path, metric: str = "mean_return") -> None:
    """PNG of learning curves: one panel per env, mean ± std over seeds of ``metric`` (a key of :data:`CURVES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = list(dict.fromkeys(r["spec"]["env_id"] for r in records))
    n_cols = min(3, max(1, len(env_ids)))
    n_rows = math.ceil(len(env_ids) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.6 * n_rows), squeeze=False)
    groups = group_records(records)
    for ax, env_id in zip(axes.flat, env_ids):
        for (group_env_id, label, _), group in groups.items():
            # Failed runs are left out: a run that failed part-way would cut every seed's curve short.
            curves = [r["evaluations"] for r in group if r["evaluations"]["timesteps"] and r["status"] != FAILED]
            if group_env_id != env_id or not curves:
                continue
            # Seeds are averaged on the evaluation points they all reached.
            common = sorted(set.intersection(*(set(c["timesteps"]) for c in curves)))
            if not common:
                continue
            values = np.array([[dict(zip(c["timesteps"], c.get(metric, [])))[t] for t in common] for c in curves
                               if len(c.get(metric, [])) == len(c["timesteps"])], dtype=float)
            if len(values) < len(curves) or np.isnan(values).any():  # some seeds do not have it
                continue
            mean, std = values.mean(axis=0), values.std(axis=0)
            ax.plot(common, mean, label=curve_label(label, len(curves)))
            ax.fill_between(common, mean - std, mean + std, alpha=0.2)
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("env steps")
        ax.set_ylabel(CURVES[metric])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(env_ids) :]:
        ax.axis("off")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_report(out: Path) -> Optional[str]:
    """Table (``results.md``), summary (``summary.json``) and curves (``learning_curves.png``; where the envs report
    ``is_success``, ``success_curves.png``) in ``out``, of every
    run record there (this invocation's and earlier ones'), so that a run on a subset never drops the others.

    :param out: output folder of the comparison
    :return: the table, or None if there is no run record
    """
    records = []
    for path in record_paths_in(out):
        try:
            records.append(read_record(path))
        except ValueError as error:
            print(f"left out of the report: {error}", file=sys.stderr)
    if not records:
        return None
    text = write_table(records, out / "results.md")
    write_json_atomically(out / "summary.json", summarize(records))
    if _has_module("matplotlib"):
        plot_curves(records, out / "learning_curves.png")
        if any(None not in r["evaluations"].get("success_rate", [None]) for r in records):
            plot_curves(records, out / "success_curves.png", metric="success_rate")
    else:
        print("matplotlib is not installed: no learning-curve plot (pip install 'sb3-elmur[extra]')", file=sys.stderr)
    return text


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _epilog() -> str:
    paragraphs = [
        "Policies: RecurrentPPO aliases (ElmurPolicy, MlpLstmPolicy, ...) run with sb3-contrib's RecurrentPPO, PPO "
        "aliases (MlpPolicy, ...) with SB3's PPO, a dotted class path with the one its base class fits; "
        "LABEL=POLICY names a variant (e.g. elmur64=ElmurPolicy, then --policy-kwargs elmur64='{\"d_model\": 64}').",
        f"Defaults (sb3_elmur/presets.py, the small parameter-matched T-Maze pair): PPO kwargs "
        f"{json.dumps(DEFAULT_PPO_KWARGS)}; policy kwargs by policy name {json.dumps(DEFAULT_POLICY_KWARGS)}. "
        "Given kwargs are merged over them; a label's kwargs on the command line replace the config file's.",
        f"POPGym ids get the wrappers {', '.join(POPGYM_WRAPPERS)} unless --wrappers says otherwise "
        "(ENV=none for none).",
        "A --config file (JSON or YAML) takes the long option names with '_': envs, policies, seeds, timesteps, "
        "n_envs, eval_freq, eval_episodes, stochastic_eval, ppo_kwargs, policy_kwargs {label: {...}}, env_kwargs "
        "{env: {...}}, wrappers {env: [name or {name: kwargs}]}, gym_packages, out, jobs, threads, device, "
        "elmur_scalars. Command-line values override it.",
        "Evaluations run at step 0, at the first rollout boundary at or after each multiple of --eval-freq, and at "
        "the end. Scores: final return (last evaluation), MMER (maximum over evaluations of the mean return) and "
        "0.5 * MMER + 0.5 (POPGym's normalisation), as mean +- std over seeds; wall time per seed includes the "
        "evaluations. A resumed run starts new episodes (and reseeds), so it is not bit-identical to an "
        "uninterrupted one. Changing the settings of existing runs is refused: use another --out. A run being "
        "trained by another invocation on the same --out is skipped (its .lock file names the process).",
        "Output in --out: runs/<env>/<label>/seed<N>.json (+ .log, .lock while running, checkpoint while "
        "unfinished, final model), tensorboard/<env>/<label>_seed<N>_1, results.md, summary.json, "
        "learning_curves.png. The report covers every run in --out, also those of earlier invocations with other "
        "policies or seeds; failed runs are marked in it.",
    ]
    return "\n\n".join(textwrap.fill(paragraph, 100, break_on_hyphens=False) for paragraph in paragraphs)


def make_parser() -> argparse.ArgumentParser:
    # The defaults are None so that a --config file can set the options; the help names the real defaults.
    parser = argparse.ArgumentParser(
        prog="python -m sb3_elmur.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument(
        "--envs", nargs="+", help="env ids (gymnasium registry; POPGym ids need popgym) (no default: give them here or in "
        "--config)",
    )
    parser.add_argument("--policies", nargs="+", help="policies or LABEL=POLICY; ALGO:POLICY picks the algorithm "
                        f"(ElmurPPO:ElmurPolicy; default: RecurrentPPO or PPO) (default: {' '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
    parser.add_argument("--timesteps", type=int, help="env steps per run (default: 100000)")
    parser.add_argument("--n-envs", type=int, help="parallel training envs per run (default: 8)")
    parser.add_argument(
        "--eval-freq", type=int, help="evaluate every this many env steps, at rollout boundaries (default: timesteps / 10)"
    )
    parser.add_argument("--eval-episodes", type=int, help="episodes per evaluation (default: 20)")
    parser.add_argument(
        "--stochastic-eval", action="store_true", default=None,
        help="sample actions when evaluating (default: off, greedy actions)",
    )  # fmt: skip
    parser.add_argument(
        "--ppo-kwargs", help='shared PPO / RecurrentPPO kwargs as JSON, e.g. \'{"n_steps": 256}\' (default: the presets below)'
    )
    parser.add_argument(
        "--policy-kwargs", nargs="+", metavar="LABEL=JSON",
        help='per-policy kwargs, e.g. ElmurPolicy=\'{"d_model": 32}\' (default: the presets below)',
    )  # fmt: skip
    parser.add_argument("--env-kwargs", nargs="+", metavar="ENV=JSON", help="per-env gym.make kwargs (default: none)")
    parser.add_argument(
        "--wrappers", nargs="+", metavar="ENV=NAMES",
        help="per-env comma-separated dotted wrapper classes, or ENV=none (default: the POPGym wrappers for POPGym "
        "ids, none for others)",
    )  # fmt: skip
    parser.add_argument(
        "--gym-packages", nargs="+", help="modules to import in each run (to register env ids) (default: none)"
    )
    parser.add_argument("--config", help="JSON or YAML file with any of the settings above (default: none)")
    parser.add_argument("--out", help="output folder, created if missing (default: compare_runs)")
    parser.add_argument("--jobs", type=int, help="runs at a time, one process each (default: 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: 1)")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument(
        "--no-elmur-scalars", dest="elmur_scalars", action="store_false", default=None,
        help="do not log ELMUR's memory scalars to TensorBoard (default: logged)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, help="seconds: stop cleanly after this, resume later (default: no limit)"
    )
    parser.add_argument(
        "--report-only", action="store_true",
        help="rebuild the table and plot from the runs in --out, without training (default: off)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    return parser


def check_writable(out: Path) -> None:
    """Fail before any training if the output folder cannot be created or written to.

    :param out: the output folder (created if missing)
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"the output folder --out {out} is not writable ({error.strerror or error})") from error


def settings_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Merge defaults, the --config file and the command line (in that order of precedence, lowest first)."""
    settings: Dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in ("policy_kwargs", "env_kwargs", "wrappers"):
        settings[key] = dict(settings.get(key) or {})
    cli: Dict[str, Any] = {
        key: getattr(args, key)
        for key in (
            "envs", "policies", "seeds", "timesteps", "n_envs", "eval_freq", "eval_episodes", "stochastic_eval",
            "gym_packages", "out", "jobs", "threads", "device", "elmur_scalars",
        )
    }
    settings.update({key: value for key, value in cli.items() if value is not None})
    if args.ppo_kwargs is not None:
        settings["ppo_kwargs"] = {**(settings.get("ppo_kwargs") or {}), **parse_json_dict(args.ppo_kwargs, "--ppo-kwargs")}
    settings["policy_kwargs"].update(parse_assignments(args.policy_kwargs, "--policy-kwargs", parse_json_dict))
    settings["env_kwargs"].update(parse_assignments(args.env_kwargs, "--env-kwargs", parse_json_dict))
    settings["wrappers"].update(parse_assignments(args.wrappers, "--wrappers", parse_wrapper_list))
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(Path(args.worker), args.deadline, args.lock_fd)
    prepared = PreparedRuns([], [], [], {})
    try:
        settings = settings_from_args(args)
        out = Path(settings.get("out") or "compare_runs")
        jobs = check_int("jobs", settings.get("jobs", 1))
        options = dict(
            threads=check_int("threads", settings.get("threads", 1)),
            device=settings.get("device") or "cpu",
            elmur_scalars=bool(settings.get("elmur_scalars", True)),
        )
        check_device(options["device"], "--device")
        if args.time_budget is not None and args.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive, got {args.time_budget}")
        if args.report_only:
            if not record_paths_in(out):
                raise ValueError(f"--report-only: no run records in {out / 'runs'}")
        else:
            specs = build_specs(settings)
        check_writable(out)
    except ValueError as error:
        parser.error(str(error))
    failed: List[Path] = []
    if not args.report_only:
        try:
            prepared = prepare_runs(out, specs, options)
        except ValueError as error:
            parser.error(str(error))
        try:
            check_runs([read_record(path)["spec"] for path in prepared.to_run])
        except ValueError as error:
            prepared.release()
            parser.error(str(error))
        try:
            busy = f"{len(prepared.busy)} running elsewhere (skipped), " if prepared.busy else ""
            print(
                f"{len(specs)} runs: {len(prepared.finished)} finished (skipped), {busy}{len(prepared.to_run)} to run",
                flush=True,
            )
            for busy in prepared.busy:
                print(f"skipped, running elsewhere: {busy}", flush=True)
            deadline = _clock() + args.time_budget if args.time_budget else None
            failed = launch_runs(prepared.to_run, jobs, deadline, prepared.locks)
        finally:
            prepared.release()
    text = write_report(out)
    if args.report_only and not text:
        parser.error(f"--report-only: no readable run records in {out / 'runs'}")
    if text:
        print(text)
        print(f"table: {out / 'results.md'}, curves: {out / 'learning_curves.png'}, tensorboard: {out / 'tensorboard'}")
    for path in failed:
        print(f"FAILED: {path} (log: {path.with_suffix('.log')})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
