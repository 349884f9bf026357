"""Evaluation of a recurrent policy on any VecEnv: greedy or sampled actions through one acting path, and the
check that a model's spaces match an env's."""

from typing import Any, Callable, Optional

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from sb3_elmur.common.actor import ElmurActor
from sb3_elmur.common.backbone import fresh_recurrent_state
from sb3_elmur.common.checks import check_bool, check_int
from sb3_elmur.common.policies import ElmurPolicy


def _first_episodes(
    act: Callable[[np.ndarray, np.ndarray], np.ndarray],
    env: VecEnv,
    max_steps: int,
    progress_bar: bool,
    desc: str,
    require_success_key: bool = False,
) -> np.ndarray:
    """Run ``env`` until the first episode of every env has ended (at most ``max_steps`` steps) and close it.

    :param act: the actor (observations, episode starts) -> actions
    :param env: the episodes, one per env
    :param max_steps: steps after which unfinished episodes count as failures
    :param progress_bar: show a tqdm progress bar over steps
    :param desc: the progress bar's label
    :param require_success_key: raise if an episode ends without ``info["is_success"]`` (else it is a failure)
    :return: the success (``info["is_success"]``) of each env's first episode (False if unfinished)
    :raise ValueError: with ``require_success_key``, naming the env whose episode ended without the key
    """
    n_episodes = env.num_envs
    # Every episode starts at the first step, which resets the state the actor kept from earlier runs.
    episode_start = np.ones(n_episodes, dtype=bool)
    success = np.zeros(n_episodes, dtype=bool)
    finished = np.zeros(n_episodes, dtype=bool)
    steps = range(max_steps)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, mininterval=2.0)
    try:
        obs = env.reset()
        for _ in steps:
            obs, _, dones, infos = env.step(act(obs, episode_start))
            for i in np.flatnonzero(dones & ~finished):
                if require_success_key and "is_success" not in infos[i]:
                    # Counted as failures, such episodes made a success rate of 0.0 out of an env that has none.
                    raise ValueError(
                        f"env {i} of {type(env).__name__} ended an episode without info['is_success'] (its info "
                        f"keys: {sorted(infos[i])}): evaluate_success needs an env that reports whether each "
                        "episode succeeded"
                    )
                success[i] = infos[i].get("is_success", False)
            finished |= dones
            episode_start = dones
            if finished.all():
                break
    finally:
        if progress_bar:
            steps.close()
        env.close()
    return success


def evaluate_success(
    model: BaseAlgorithm,
    env: VecEnv,
    max_steps: int,
    deterministic: bool = True,
    progress_bar: bool = False,
    compile: bool = False,
) -> float:
    """Success rate of ``model`` over the first episode of every env of ``env`` (any VecEnv that reports
    ``info["is_success"]``, e.g. ``NoisyRecallVecEnv(100, length=100_000)``), run as one batch; closes ``env``.

    :param model: trained model, or any object with ``predict(obs, state, episode_start, deterministic)``
    :param env: the episodes, one per env
    :param max_steps: steps after which unfinished episodes count as failures (a positive integer)
    :param deterministic: act greedily
    :param progress_bar: show a tqdm progress bar over steps
    :param compile: ElmurPolicy only: act through ``torch.compile`` (see :func:`evaluate_tmaze`)
    :return: fraction of successful episodes
    :raise ValueError: if ``max_steps`` is not a positive integer, the model's spaces are not the env's, or an
        episode ends without ``info["is_success"]``
    """
    try:
        check_int("max_steps", max_steps)
        deterministic, compile = check_bool("deterministic", deterministic), check_bool("compile", compile)
        check_model_spaces(model, env.observation_space, env.action_space, f"the env {type(env).__name__}")
    except ValueError:
        env.close()  # as promised: closed whatever happens
        raise
    act = _actor(model, deterministic, compile)
    success = _first_episodes(act, env, max_steps, progress_bar, "evaluation", require_success_key=True)
    return float(success.mean())


def _space_signature(space: spaces.Space) -> Any:
    """What must agree between a model's space and an env's for the model to act there: the kind of space, its
    shape and, for discrete spaces, the number of choices (bounds may differ, e.g. through wrappers)."""
    if isinstance(space, spaces.Dict):
        return ("Dict", tuple((key, _space_signature(sub)) for key, sub in space.spaces.items()))
    if isinstance(space, spaces.Discrete):
        return ("Discrete", int(space.n))
    if isinstance(space, spaces.MultiDiscrete):
        return ("MultiDiscrete", tuple(int(n) for n in np.asarray(space.nvec).flatten()))
    return (type(space).__name__, tuple(space.shape or ()))


def check_model_spaces(
    model: Any, observation_space: spaces.Space, action_space: spaces.Space, env_name: str
) -> None:
    """Check that ``model`` (a SB3 model or policy; an object without spaces, such as a scripted policy, passes) was
    made for the env's spaces: a model of another env acts on observations it cannot read, with actions that mean
    something else, and scores without an error.

    :param model: the model to evaluate
    :param observation_space: the env's observation space
    :param action_space: the env's action space
    :param env_name: how the error names the env
    :raise ValueError: naming both spaces of the side that differs
    """
    for role, env_space in (("observation", observation_space), ("action", action_space)):
        model_space = getattr(model, f"{role}_space", None)
        if isinstance(model_space, spaces.Space) and _space_signature(model_space) != _space_signature(env_space):
            raise ValueError(
                f"the model's {role} space is {model_space}, {env_name}'s is {env_space}: the model was made for "
                "another env"
            )


def _actor(
    model: BaseAlgorithm, deterministic: bool, compile: bool = False
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (observations, episode starts) -> actions that carries the recurrent state itself
    (``compile``: see ``evaluate_tmaze``)."""
    policy = getattr(model, "policy", None)
    if not isinstance(policy, RecurrentActorCriticPolicy):
        state = None

        def act_with_predict(obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
            nonlocal state
            actions, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
            return actions

        return act_with_predict

    # RecurrentActorCriticPolicy.predict, without its per-step mode switch and numpy round trips of the state.
    policy.set_training_mode(False)
    device = policy.device  # a property that walks the parameters: read it once
    if isinstance(policy, ElmurPolicy):
        return _elmur_actor(policy, deterministic, device, compile)
    states = None

    def act(obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        nonlocal states
        with th.no_grad():
            obs_tensor = _obs_tensor(policy, obs, device)
            if states is None:
                states = fresh_recurrent_state(policy, len(episode_start), device)
            starts = th.as_tensor(episode_start, dtype=th.float32, device=device)
            actions, states = policy._predict(obs_tensor, states, starts, deterministic=deterministic)
        return _env_actions(policy, actions)

    return act


def _elmur_actor(
    policy: ElmurPolicy, deterministic: bool, device: th.device, compile: bool = False
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Actions through an :class:`~sb3_elmur.common.actor.ElmurActor` (the unpacked state and the layer outputs of
    its segment); greedy Discrete actions as the argmax of the logits, without a distribution object."""
    greedy_logits = deterministic and isinstance(policy.action_space, spaces.Discrete)
    actor: Optional[ElmurActor] = None

    def act(obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        nonlocal actor
        with th.no_grad():
            if actor is None:
                actor = ElmurActor(policy, len(episode_start), compile=compile)
            obs_tensor = _obs_tensor(policy, obs, device)
            latent_pi, _ = actor.step(obs_tensor, th.as_tensor(episode_start, dtype=th.bool, device=device))
            if greedy_logits:
                actions = policy.action_net(latent_pi).argmax(dim=1)
            else:
                actions = policy._get_action_dist_from_latent(latent_pi).get_actions(deterministic=deterministic)
        return _env_actions(policy, actions)

    return act


def _obs_tensor(policy: RecurrentActorCriticPolicy, obs: Any, device: th.device) -> Any:
    """The observations as the policy takes them: a tensor, or for Dict observations (MultiInputElmurPolicy, e.g.
    ManiSkill's "rgb+joints") a dict of tensors, as ``predict`` makes them."""
    if isinstance(obs, dict):
        return policy.obs_to_tensor(obs)[0]
    return th.as_tensor(obs, device=device)


def _env_actions(policy: RecurrentActorCriticPolicy, actions: th.Tensor) -> np.ndarray:
    """The policy's actions as ``predict`` hands them to an env: shaped as the action space, and Box actions
    unscaled (a squashing policy) or clipped to the bounds (a Gaussian's samples and mean are unbounded).

    :param policy: the policy that chose the actions
    :param actions: [n_envs, ...] actions from its distribution
    :return: the actions for ``env.step``
    """
    space = policy.action_space
    array = actions.cpu().numpy().reshape((-1, *space.shape))
    if isinstance(space, spaces.Box):
        array = policy.unscale_action(array) if policy.squash_output else np.clip(array, space.low, space.high)
    return array
