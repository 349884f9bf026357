"""One run, in its own process: train, evaluate, checkpoint at every evaluation and resume from it, and keep
the run's record up to date."""

import importlib.util
import os
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from sb3_elmur.common.utils import (
    algorithm_class,
    code_commit,
    remove_leftover_temp_files,
    write_atomically,
    write_json_atomically,
    zip_problem,
)
from sb3_elmur.compare.envs import make_env, make_model
from sb3_elmur.compare.locks import RunLock
from sb3_elmur.compare.records import FAILED, FINISHED, UNFINISHED, RunPaths, new_record, read_record, run_scores
from sb3_elmur.compare.spec import resolve_classes, resolve_policy


# Evaluation envs get other seeds than the training envs of the same run.
EVAL_SEED_OFFSET = 10_000
# The clock deadlines are checked against (one indirection, so that tests can stop a run at a chosen point; the
# launcher and the command read it here too, so that one patch moves them all).
_clock = time.time


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
            model = make_model(
                spec,
                env,
                options["device"],
                seed=spec["seed"],
                tensorboard_log=str(paths.tensorboard) if importlib.util.find_spec("tensorboard") is not None else None,
                verbose=0,
            )
        record["n_parameters"] = int(sum(p.numel() for p in model.policy.parameters()))
        record["versions"] = _versions()

        def checkpoint(model: Any) -> None:
            # The previous checkpoint stays in place until the new one is complete.
            write_atomically(paths.checkpoint, model.save)
            save_progress(model, UNFINISHED)

        evaluator = _build_evaluator(eval_env, spec, record, checkpoint, deadline)
        callbacks = [evaluator]
        if options["elmur_scalars"] and isinstance(model.policy, ElmurPolicy):
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
    problem = zip_problem(checkpoint)
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
        # The code that ran the run's last session, and when (for results committed from the report).
        "code_commit": code_commit(Path(sb3_elmur.__file__).parent),
        "date": date.today().isoformat(),
    }
