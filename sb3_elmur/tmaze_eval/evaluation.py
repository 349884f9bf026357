"""Batched T-Maze evaluation: success rate of a policy over many episodes at once, in worker processes."""

import multiprocessing
import multiprocessing.connection
import signal
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_elmur.common.checks import check_bool, check_int
from sb3_elmur.common.evaluation import _actor, _first_episodes, check_model_spaces
from sb3_elmur.common.policies import ElmurPolicy
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.envs.tmaze import _check_corridor_length, _check_variant

# Seconds a stopped worker gets to exit after SIGTERM before it is killed.
_STOP_TIMEOUT = 5.0


class EvaluationWorkerError(RuntimeError):
    """A worker process of the evaluation failed (its error) or died (its exit code or signal)."""


class TMazeResult(NamedTuple):
    """Result of one corridor length (see :func:`evaluate_tmaze_corridors`)."""

    corridor_length: int
    #: fraction of the episodes that reached the correct goal
    success: float
    #: seconds of the steps (the slowest worker's), compiling excluded
    seconds: float
    #: seconds spent compiling before these steps (``compile=True``: the first corridor only, else 0)
    compile_seconds: float


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
    as tensors. For several corridor lengths, :func:`evaluate_tmaze_corridors` compiles (and forks) only once.

    :param model: trained model (RecurrentPPO, RecurrentBC, PPO, ...) or any object with that ``predict``
    :param corridor_length: corridor length L (episodes last at most L + 2 steps)
    :param n_episodes: number of episodes (one per env of the batch)
    :param variant: "passive" or "reference" (success is the same: reaching the cued goal)
    :param deterministic: act greedily
    :param seed: seed of the observation noise (worker ``i`` uses ``seed + i``)
    :param progress_bar: show a tqdm progress bar over steps (long corridors)
    :param n_workers: split the episodes over this many forked processes (one core each)
    :param compile: ElmurPolicy only (ignored otherwise): act through ``torch.compile`` (about 2x faster per step
        on CPU, same actions; needs a C++ compiler). Every process compiles for itself before its first steps
        (tens of seconds); a failure raises a RuntimeError (evaluate without ``compile`` then).
    :return: fraction of episodes that reached the correct goal
    """
    results = list(
        evaluate_tmaze_corridors(
            model, [corridor_length], n_episodes, variant, deterministic, seed, progress_bar, n_workers, compile
        )
    )
    return results[0].success


def evaluate_tmaze_corridors(
    model: BaseAlgorithm,
    corridor_lengths: Sequence[int],
    n_episodes: int = 100,
    variant: str = "passive",
    deterministic: bool = True,
    seed: Optional[int] = 0,
    progress_bar: bool = False,
    n_workers: int = 1,
    compile: bool = False,
) -> Iterator[TMazeResult]:
    """:func:`evaluate_tmaze` at several corridor lengths, one after the other, yielding each one's result as soon
    as it is known (keep them: a later, longer corridor may fail). Every process builds its actor once, so with
    ``compile`` it compiles once, before the first corridor's steps, and reports that time apart.

    The arguments are checked at once (a ValueError names the bad one), the episodes run as the results are
    iterated. If a worker fails or dies (for instance killed by the out-of-memory killer), an
    :class:`EvaluationWorkerError` (a RuntimeError) names it and its error, exit code or signal; no worker outlives
    the iteration.

    :param corridor_lengths: corridor lengths, evaluated in this order
    :return: an iterator over one :class:`TMazeResult` per corridor length (other parameters: see
        :func:`evaluate_tmaze`)
    """
    corridor_lengths = check_tmaze_evaluation(corridor_lengths, n_episodes, n_workers)
    _check_variant(variant)
    deterministic, compile = check_bool("deterministic", deterministic), check_bool("compile", compile)
    probe = TMazeVecEnv(1, corridor_length=corridor_lengths[0], variant=variant)
    check_model_spaces(model, probe.observation_space, probe.action_space, f"the T-Maze ({variant})")
    probe.close()
    cues = np.where(np.arange(n_episodes) < (n_episodes + 1) // 2, 1, -1)
    n_workers = min(n_workers, n_episodes)
    if n_workers == 1:
        return _evaluate_here(model, corridor_lengths, cues, variant, deterministic, seed, progress_bar, compile)
    return _evaluate_in_workers(
        model, corridor_lengths, cues, variant, deterministic, seed, progress_bar, compile, n_workers
    )


def check_tmaze_evaluation(corridor_lengths: Sequence[int], n_episodes: int, n_workers: int) -> List[int]:
    """Check the sizes of an evaluation before it starts; :return: the corridor lengths as a list of ints.

    :raise ValueError: naming the argument that is not a positive integer (or an empty ``corridor_lengths``)
    """
    check_int("n_episodes", n_episodes)
    check_int("n_workers", n_workers)
    if isinstance(corridor_lengths, (int, np.integer)) or len(corridor_lengths) == 0:
        raise ValueError(f"corridor_lengths must be a non-empty sequence of ints >= 1, got {corridor_lengths!r}")
    return [_check_corridor_length(length) for length in corridor_lengths]


def _evaluate_here(
    model: BaseAlgorithm, corridor_lengths: List[int], cues: np.ndarray, *args
) -> Iterator[TMazeResult]:
    """All episodes in this process."""
    runs = _run_corridors(model, corridor_lengths, cues, *args)
    for corridor_length, (success, seconds, compile_seconds) in zip(corridor_lengths, runs):
        yield TMazeResult(corridor_length, float(success.mean()), seconds, compile_seconds)


def _evaluate_in_workers(
    model: BaseAlgorithm,
    corridor_lengths: List[int],
    cues: np.ndarray,
    variant: str,
    deterministic: bool,
    seed: Optional[int],
    progress_bar: bool,
    compile: bool,
    n_workers: int,
) -> Iterator[TMazeResult]:
    """The episodes split over ``n_workers`` forked processes (each a share of both cues), which run all corridors
    and send each one's result through their own pipe."""
    # Fork, so that every worker inherits the model without pickling it.
    context = multiprocessing.get_context("fork")
    workers, connections = [], []
    try:
        for i, share in enumerate(np.array_split(np.random.default_rng(0).permutation(cues), n_workers)):
            reader, writer = context.Pipe(duplex=False)
            worker_seed = None if seed is None else seed + i
            args = (writer, i, model, corridor_lengths, share, variant, deterministic, worker_seed,
                    progress_bar and i == 0, compile)
            workers.append(context.Process(target=_worker, args=args, daemon=True, name=f"tmaze-eval-worker-{i}"))
            connections.append(reader)
            workers[-1].start()
            # The worker holds the only writing end left (the next forks do not inherit it): its death reads as EOF.
            writer.close()
        for corridor_length in corridor_lengths:
            results = _receive(workers, connections, corridor_length)
            success = np.concatenate([success for success, _, _ in results])
            yield TMazeResult(
                corridor_length,
                float(success.mean()),
                max(seconds for _, seconds, _ in results),
                max(compile_seconds for _, _, compile_seconds in results),
            )
    finally:
        _stop_workers(workers)
        for connection in connections:
            connection.close()


def _worker(connection: multiprocessing.connection.Connection, index: int, *args) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers and says so in one line, where each
    # worker would print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    th.set_num_threads(1)
    try:
        for result in _run_corridors(*args):
            connection.send(result)
    except Exception as error:  # reported by the parent, which names the worker
        connection.send(f"{type(error).__name__}: {error}")
    finally:
        connection.close()


def _receive(
    workers: List[multiprocessing.process.BaseProcess],
    connections: List[multiprocessing.connection.Connection],
    corridor_length: int,
) -> List[Tuple[np.ndarray, float, float]]:
    """Every worker's next result (that of ``corridor_length``), waiting on the pipes and on the processes
    themselves, so that a worker that dies without a word raises instead of blocking forever."""
    results: Dict[int, Tuple[np.ndarray, float, float]] = {}
    while len(results) < len(workers):
        waiting = [i for i in range(len(workers)) if i not in results]
        ready = multiprocessing.connection.wait(
            [connections[i] for i in waiting] + [workers[i].sentinel for i in waiting]
        )
        for i in waiting:
            # Read before judging the process: a worker may send its result and exit at once.
            if connections[i].poll():
                try:
                    message = connections[i].recv()
                except EOFError:
                    raise _worker_died(i, workers[i], corridor_length) from None
                if isinstance(message, str):
                    raise EvaluationWorkerError(f"T-Maze evaluation worker {i} failed: {message}")
                results[i] = message
            elif workers[i].sentinel in ready:
                raise _worker_died(i, workers[i], corridor_length)
    return [results[i] for i in range(len(workers))]


def _worker_died(
    index: int, worker: multiprocessing.process.BaseProcess, corridor_length: int
) -> EvaluationWorkerError:
    worker.join(_STOP_TIMEOUT)  # collects the exit code
    code = worker.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            how = f"was killed by signal {-code} (exit code {code})"
    else:
        how = f"exited with code {code}"
    return EvaluationWorkerError(
        f"T-Maze evaluation worker {index} {how} before finishing corridor {corridor_length}; a SIGKILL is often "
        "the out-of-memory killer: evaluate with fewer workers or fewer episodes (--workers, --episodes)"
    )


def _stop_workers(workers: List[multiprocessing.process.BaseProcess]) -> None:
    """Join the workers, terminating (then killing) those still running: none outlives an error."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(_STOP_TIMEOUT)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _run_corridors(
    model: BaseAlgorithm,
    corridor_lengths: List[int],
    cues: np.ndarray,
    variant: str,
    deterministic: bool,
    seed: Optional[int],
    progress_bar: bool,
    compile: bool = False,
) -> Iterator[Tuple[np.ndarray, float, float]]:
    """Run one batch of episodes (one per cue) at each corridor length with one actor, built (and compiled) once.

    :return: per corridor, the success of each episode, the seconds of its steps and the seconds spent compiling
        before them
    """
    act = _actor(model, deterministic, compile)
    start = time.perf_counter()
    policy = getattr(model, "policy", None)
    if compile and isinstance(policy, ElmurPolicy):
        # Compile before the steps, so that neither their time nor the progress bar's estimate includes it.
        _warm_up(act, policy, len(cues))
    compile_seconds = time.perf_counter() - start if compile else 0.0
    for corridor_length in corridor_lengths:
        start = time.perf_counter()
        success = _run_episodes(act, corridor_length, cues, variant, seed, progress_bar)
        yield success, time.perf_counter() - start, compile_seconds
        compile_seconds = 0.0


def _warm_up(act: Callable[[np.ndarray, np.ndarray], np.ndarray], policy: ElmurPolicy, n_envs: int) -> None:
    """Act for one segment and a step on dummy observations: that runs (so compiles) both graphs of the step,
    mid-segment and segment-completing. The episodes that follow all start afresh."""
    space = policy.observation_space
    obs = np.zeros((n_envs, *space.shape), dtype=space.dtype)
    for step in range(policy.lstm_actor.model.config.context_length + 1):
        act(obs, np.full(n_envs, step == 0))


def _run_episodes(
    act: Callable[[np.ndarray, np.ndarray], np.ndarray],
    corridor_length: int,
    cues: np.ndarray,
    variant: str,
    seed: Optional[int],
    progress_bar: bool,
) -> np.ndarray:
    """Run one T-Maze episode per cue in one batch; :return: success of each episode."""
    env = TMazeVecEnv(len(cues), corridor_length=corridor_length, variant=variant, seed=seed, cues=cues)
    return _first_episodes(act, env, env.time_limit, progress_bar, f"T-Maze L={corridor_length}")


