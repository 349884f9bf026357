"""Batched T-Maze evaluation: success rate of a policy over many episodes at once."""

import multiprocessing
from typing import Callable, Optional, Tuple

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BaseModel

from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.model import ElmurState
from sb3_elmur.policies import ElmurPolicy

# Fixed shapes (one batch per run); the C++ wrapper cuts the per-call overhead of the compiled graph (measured).
COMPILE_OPTIONS = dict(dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def evaluate_tmaze(
    model: BaseAlgorithm,
    corridor_length: int,
    n_episodes: int = 100,
    variant: str = "passive",
    deterministic: bool = True,
    seed: Optional[int] = 0,
    progress_bar: bool = False,
    n_workers: int = 1,
    compile: bool = False,
) -> float:
    """Success rate of ``model`` on ``n_episodes`` T-Maze episodes, half with each cue, run as one batch.

    Works with any model that has ``predict(obs, state, episode_start, deterministic)``, recurrent or not;
    sb3-contrib recurrent policies (ElmurPolicy, MlpLstmPolicy) act through a leaner loop that keeps their state
    as tensors.

    :param model: trained model (RecurrentPPO, RecurrentBC, PPO, ...) or any object with that ``predict``
    :param corridor_length: corridor length L (episodes last at most L + 2 steps)
    :param n_episodes: number of episodes (one per env of the batch)
    :param variant: "passive" or "reference" (success is the same: reaching the cued goal)
    :param deterministic: act greedily
    :param seed: seed of the observation noise (worker ``i`` uses ``seed + i``)
    :param progress_bar: show a tqdm progress bar over steps (long corridors)
    :param n_workers: split the episodes over this many forked processes (one core each)
    :param compile: ElmurPolicy only (ignored otherwise): act through ``torch.compile`` (about 2x faster per step
        on CPU, same actions; needs a C++ compiler). Every process compiles for itself at its first steps
        (tens of seconds); a failure raises a RuntimeError (evaluate without ``compile`` then).
    :return: fraction of episodes that reached the correct goal
    """
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    cues = np.where(np.arange(n_episodes) < (n_episodes + 1) // 2, 1, -1)
    n_workers = min(n_workers, n_episodes)
    if n_workers == 1:
        success = _run_episodes(model, corridor_length, cues, variant, deterministic, seed, progress_bar, compile)
        return float(success.mean())
    # Fork, so that every worker inherits the model without pickling it; each runs a share of both cues.
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    workers = []
    for i, share in enumerate(np.array_split(np.random.default_rng(0).permutation(cues), n_workers)):
        worker_seed = None if seed is None else seed + i
        args = (queue, i, model, corridor_length, share, variant, deterministic, worker_seed, progress_bar and i == 0,
                compile)
        workers.append(context.Process(target=_worker, args=args, daemon=True))
        workers[-1].start()
    results = dict(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    failed = [i for i in range(n_workers) if not isinstance(results.get(i), np.ndarray)]
    if failed:
        raise RuntimeError(f"T-Maze evaluation worker {failed[0]} failed: {results.get(failed[0])}")
    return float(np.concatenate([results[i] for i in range(n_workers)]).mean())


def _worker(queue, index: int, *args) -> None:
    th.set_num_threads(1)
    try:
        queue.put((index, _run_episodes(*args)))
    except Exception as error:  # reported by the parent, which would otherwise wait forever
        queue.put((index, f"{type(error).__name__}: {error}"))


def _run_episodes(
    model: BaseAlgorithm,
    corridor_length: int,
    cues: np.ndarray,
    variant: str,
    deterministic: bool,
    seed: Optional[int],
    progress_bar: bool,
    compile: bool = False,
) -> np.ndarray:
    """Run one episode per cue in one batch; :return: success of each episode."""
    n_episodes = len(cues)
    env = TMazeVecEnv(n_episodes, corridor_length=corridor_length, variant=variant, seed=seed, cues=cues)
    act = _actor(model, deterministic, compile)
    obs = env.reset()
    episode_start = np.ones(n_episodes, dtype=bool)
    success = np.zeros(n_episodes, dtype=bool)
    finished = np.zeros(n_episodes, dtype=bool)
    steps = range(env.time_limit)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"T-Maze L={corridor_length}", mininterval=2.0)
    for _ in steps:
        obs, _, dones, infos = env.step(act(obs, episode_start))
        for i in np.flatnonzero(dones & ~finished):
            success[i] = infos[i]["is_success"]
        finished |= dones
        episode_start = dones
        if finished.all():
            break
    env.close()
    return success


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
            obs_tensor = th.as_tensor(obs, device=device)
            if states is None:
                shape = (policy.lstm_hidden_state_shape[0], len(obs), policy.lstm_hidden_state_shape[2])
                states = (th.zeros(shape, device=device), th.zeros(shape, device=device))
            starts = th.as_tensor(episode_start, dtype=th.float32, device=device)
            actions, states = policy._predict(obs_tensor, states, starts, deterministic=deterministic)
        return actions.cpu().numpy()

    return act


def _elmur_actor(
    policy: ElmurPolicy, deterministic: bool, device: th.device, compile: bool = False
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The actor part of ``ElmurPolicy._predict`` on an ``ElmurState`` kept between steps, with the layer
    outputs of its segment (``ElmurModel.step``): packing the state into the LSTM-shaped pair and back, which
    only RecurrentPPO's buffer needs, cost as much as the heads per step.

    With ``compile``, steps that start no episode run ``torch.compile``d (two graphs: mid-segment and
    segment-completing steps, see ``ElmurModel.step_core``); the others (the first step and episode ends) run
    eagerly."""
    model = policy.lstm_actor.model
    # Greedy discrete actions are the argmax of the logits: no distribution object per step.
    greedy_logits = deterministic and isinstance(policy.action_space, spaces.Discrete)

    def policy_step(
        obs: th.Tensor, state: ElmurState, branches: tuple, outputs: Optional[th.Tensor]
    ) -> Tuple[th.Tensor, ElmurState, th.Tensor]:
        """Observations -> greedy actions, or the actor's latent when actions are sampled (outside the graph)."""
        features = BaseModel.extract_features(policy, obs, policy.pi_features_extractor)
        latent, state, outputs = model.step_core(features, state, *branches, outputs)
        latent_pi = policy.mlp_extractor.forward_actor(latent)
        return policy.action_net(latent_pi).argmax(dim=1) if greedy_logits else latent_pi, state, outputs

    compiled_step = th.compile(policy_step, **COMPILE_OPTIONS) if compile else policy_step
    state, outputs = None, None

    def act(obs: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        nonlocal state, outputs
        with th.no_grad():
            obs_tensor = th.as_tensor(obs, device=device)
            if state is None:
                state = model.initial_state(len(obs), device)
            branches = model.step_branches(state, th.as_tensor(episode_start, dtype=th.bool, device=device))
            if compile and branches[2] is None and outputs is not None:
                try:
                    out, state, outputs = compiled_step(obs_tensor, state, branches, outputs)
                except Exception as error:
                    message = f"{type(error).__name__}: {error}".splitlines()[0]
                    raise RuntimeError(
                        f"torch.compile of the acting step failed ({message}); on CPU it needs a working C++ "
                        "compiler: evaluate without compile=True (--compile)"
                    ) from error
            else:
                out, state, outputs = policy_step(obs_tensor, state, branches, outputs)
            if not greedy_logits:
                out = policy._get_action_dist_from_latent(out).get_actions(deterministic=deterministic)
        return out.cpu().numpy()

    return act
