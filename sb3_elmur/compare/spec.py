"""Settings of a comparison -> run specs: defaults, the --config file and the flags, policy and algorithm
names, and every check that can be made before a run is launched."""

import argparse
import importlib
import inspect
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sb3_elmur.common.checks import check_int
from sb3_elmur.common.presets import TMAZE_LSTM_POLICY_KWARGS, TMAZE_POLICY_KWARGS, TMAZE_PPO_KWARGS
from sb3_elmur.common.utils import algorithm_class
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
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# Algorithms a policy may name (ALGO:POLICY); without one, the policy's own: RecurrentPPO or PPO.
ALGORITHMS = ("ElmurPPO", "RecurrentPPO", "PPO")


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


def resolve_wrappers(names: Sequence[Any]) -> List[Tuple[type, Dict[str, Any]]]:
    """The wrapper classes named in ``names`` (dotted names, or ``{name: kwargs}``), each with its keyword arguments."""
    classes = []
    for entry in names:
        if isinstance(entry, dict):
            if len(entry) != 1:
                raise ValueError(f"a wrapper with arguments is written {{name: kwargs}}, got {entry!r}")
            name, kwargs = next(iter(entry.items()))
        else:
            name, kwargs = entry, {}
        classes.append((_import_name(name, "wrapper"), dict(kwargs or {})))
    return classes


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
    "archive",
    "reference",
    "tie",
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
        resolve_wrappers(names)  # fail early on names that do not import

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
    # The options that are not mappings (those are merged key by key, below).
    cli: Dict[str, Any] = {key: getattr(args, key) for key in CONFIG_KEYS if key not in DICT_KEYS}
    settings.update({key: value for key, value in cli.items() if value is not None})
    if args.ppo_kwargs is not None:
        settings["ppo_kwargs"] = {**(settings.get("ppo_kwargs") or {}), **parse_json_dict(args.ppo_kwargs, "--ppo-kwargs")}
    settings["policy_kwargs"].update(parse_assignments(args.policy_kwargs, "--policy-kwargs", parse_json_dict))
    settings["env_kwargs"].update(parse_assignments(args.env_kwargs, "--env-kwargs", parse_json_dict))
    settings["wrappers"].update(parse_assignments(args.wrappers, "--wrappers", parse_wrapper_list))
    return settings

