"""Building the envs and the model of a run spec, and setting up every env and algorithm once before any worker
starts."""

import functools
import importlib
import json
from typing import Any, Callable, Dict, List, Optional, Sequence

from sb3_elmur.common.utils import algorithm_class
from sb3_elmur.compare.spec import resolve_classes, resolve_policy, resolve_wrappers
from sb3_elmur.envs import mikasa_family
from sb3_elmur.envs.popgym import _import_popgym, is_popgym_id


def make_wrapper_fn(names: Sequence[Any]) -> Optional[Callable]:
    """A function applying the wrappers named in ``names`` (dotted names, or ``{name: kwargs}``) in order."""
    if not names:
        return None
    classes = resolve_wrappers(names)

    def wrap(env: Any) -> Any:
        for wrapper_class, kwargs in classes:
            env = wrapper_class(env, **kwargs)
        return env

    return wrap


def make_env(spec: Dict[str, Any], n_envs: int, seed: int) -> Any:
    """The run's vectorized env: ``gym.make`` (no render mode forced), Monitor, then the spec's wrappers."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

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


def make_model(spec: Dict[str, Any], env: Any, device: str, **kwargs: Any) -> Any:
    """A new model of a run: the spec's algorithm and policy class, with its policy and PPO keyword arguments.

    :param spec: the run's spec
    :param env: the env it trains on
    :param device: torch device
    :param kwargs: other keyword arguments of the algorithm (``seed``, ``tensorboard_log``, ``verbose``)
    :return: the model
    """
    _, policy_class = resolve_policy(spec["policy"])
    return algorithm_class(spec["algo"])(
        policy_class, env, policy_kwargs=resolve_classes(spec["policy_kwargs"]), device=device, **kwargs,
        **spec["ppo_kwargs"],
    )  # fmt: skip


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
            make_model(spec, env, "cpu")
        except Exception as error:
            raise ValueError(
                f"cannot set up {spec['algo']} with the policy {spec['label']}={spec['policy']} on {spec['env_id']!r} "
                f"(PPO kwargs {spec['ppo_kwargs']}, policy kwargs {spec['policy_kwargs']}): "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            env.close()
