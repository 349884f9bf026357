"""The CPU backend of :class:`~sb3_elmur.envs.maniskill.ManiSkillVecEnv`: one CPU-simulated env per subprocess
(ManiSkill's CPU backend holds one env per process), and the protocol between the workers and the parent:
``(command, payload)`` messages answered with numpy results, failures sent back and raised in the parent."""

import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch as th
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper

from sb3_elmur.envs.maniskill.batch import _Batch
from sb3_elmur.envs.maniskill.env import ManiSkillEnv
from sb3_elmur.envs.maniskill.observations import TorchObs, _stack


class WorkerError(RuntimeError):
    """A ManiSkill worker process failed (its exception type and message)."""


class _Failure:
    """An exception raised in a worker, sent to the parent (which raises it there, naming the worker)."""

    def __init__(self, error: BaseException, fatal: bool) -> None:
        self.kind, self.message, self.fatal = type(error).__name__, str(error), fatal

    def raise_in_parent(self, worker: int) -> None:
        message = f"ManiSkill worker {worker}: {self.kind}: {self.message}"
        # AttributeError stays one: SB3's VecEnv asks for attributes that an env may lack (render_mode)
        raise (AttributeError if self.kind == "AttributeError" and not self.fatal else WorkerError)(message)


def _serve(env: ManiSkillEnv, command: str, payload: Any) -> Any:
    """The answer of a worker holding ``env`` to one command."""
    if command == "reset":
        return env.reset(seed=payload)[0]
    if command == "step":
        obs, reward, terminated, truncated, info = env.step(payload)
        return obs, reward, terminated, truncated, info.get("is_success", False)
    if command == "spaces":
        return env.action_space, env.observation_space
    if command == "render":
        return env.render()
    if command == "call":
        name, args, kwargs = payload
        return env.env.get_wrapper_attr(name)(*args, **kwargs)
    if command == "get_attr":
        return env.env.get_wrapper_attr(payload)
    if command == "set_attr":
        return env.env.set_wrapper_attr(*payload)
    raise NotImplementedError(f"unknown command {command!r}")


def _worker(remote: Connection, parent: Connection, make_env: CloudpickleWrapper) -> None:
    """Holds one CPU-simulated env and answers (command, payload) messages with numpy results; a failed command
    is answered with its exception and the worker serves on, a failure to build the env ends it."""
    parent.close()
    env = None
    try:
        env = make_env.var()
        while True:
            command, payload = remote.recv()
            if command == "close":
                break
            try:
                answer = _serve(env, command, payload)
            except Exception as error:
                answer = _Failure(error, fatal=False)
            remote.send(answer)
    except KeyboardInterrupt:
        pass
    except BaseException as error:
        try:
            remote.send(_Failure(error, fatal=True))
        except (BrokenPipeError, EOFError):
            pass
    finally:
        if env is not None:
            env.close()
        remote.close()


class _CpuBatch(_Batch):
    """``num_envs`` CPU-simulated ManiSkill envs, one per subprocess; observations arrive as numpy."""

    def __init__(self, make_env: Callable[[], ManiSkillEnv], num_envs: int, start_method: Optional[str] = None) -> None:
        # forkserver (SB3's default too): the workers start clean, whatever this process has imported
        context = mp.get_context(start_method or "forkserver")
        self.num_envs, self.device = num_envs, th.device("cpu")
        self.remotes, self.processes = [], []
        for _ in range(num_envs):
            remote, work_remote = context.Pipe()
            process = context.Process(target=_worker, daemon=True, args=(
                work_remote, remote, CloudpickleWrapper(make_env)))
            process.start()
            work_remote.close()
            self.remotes.append(remote)
            self.processes.append(process)
        self.action_space, self.observation_space = self._ask([0], "spaces", None)[0]

    def _ask(self, indices: Sequence[int], command: str, payloads: Any) -> List[Any]:
        """Send ``command`` to the workers ``indices`` (``payloads``: a list, one each, or one for all) and
        return their answers; every answer is read before a failure is raised, so the pipes stay in step."""
        for position, index in enumerate(indices):
            payload = payloads[position] if isinstance(payloads, list) else payloads
            self.remotes[index].send((command, payload))
        answers = []
        for index in indices:
            try:
                answers.append(self.remotes[index].recv())
            except (EOFError, OSError):  # the worker died (an import error in a forkserver child included)
                self.processes[index].join(timeout=5)
                answers.append(_Failure(EOFError(f"died (exit code {self.processes[index].exitcode})"), fatal=True))
        for index, answer in zip(indices, answers):
            if isinstance(answer, _Failure):
                answer.raise_in_parent(index)
        return answers

    def reset(self, seeds: Optional[List[Optional[int]]], env_idx: Optional[np.ndarray]) -> TorchObs:
        indices = list(range(self.num_envs)) if env_idx is None else [int(i) for i in env_idx]
        seed_list = [None if seeds is None else seeds[i] for i in indices]
        observations = self._ask(indices, "reset", seed_list)
        return _stack(observations)

    def step(self, actions: np.ndarray) -> Tuple[TorchObs, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        answers = self._ask(range(self.num_envs), "step", list(np.asarray(actions)))
        obs, reward, terminated, truncated, success = zip(*answers)
        return (_stack(list(obs)), th.tensor(reward, dtype=th.float32), th.tensor(terminated), th.tensor(truncated),
                th.tensor(success))

    def render(self) -> List[np.ndarray]:
        return self._ask(range(self.num_envs), "render", None)

    def call(self, name: str, indices: List[int], args: tuple, kwargs: dict) -> List[Any]:
        return self._ask(indices, "call", (name, args, kwargs))

    def get_attr(self, name: str, indices: List[int]) -> List[Any]:
        return self._ask(indices, "get_attr", name)

    def set_attr(self, name: str, value: Any, indices: List[int]) -> None:
        self._ask(indices, "set_attr", (name, value))

    def close(self) -> None:
        for remote in self.remotes:
            try:
                remote.send(("close", None))
            except (BrokenPipeError, EOFError):
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
