"""Online memory benchmark: what PPO learns at each algorithm's defaults on tasks where memory decides success.

Tasks (chance in brackets):

- ``recall-D``: noisy recall online (``sb3_elmur.envs.recall``): one of 3 cues at the first step, 2 Gaussian noise
  entries at every step, the query at step D +- 5, reward 1 only for naming the cue there (0.33);
- ``tmaze-100``: the passive T-Maze at a fixed corridor of 100, ``n_steps=64`` (0.50);
- ``RepeatFirstMedium``, ``CountRecallMedium``: POPGym (greedy mean episode return, not a success rate).

Policies, each at its algorithm's defaults (only the env, 8 envs and the budget given; ``--ppo-kwargs`` and
``--policy-kwargs`` add settings under a ``--label`` of their own, for diagnosis runs): ElmurPPO + ElmurPolicy,
RecurrentPPO + ElmurPolicy, RecurrentPPO + MlpLstmPolicy. Runs alternate between policies (seed, task, policy order)
so that policies sharing the cores share them alike. Every ``--eval-every`` env steps: greedy success over 200
episodes of evaluation seeds the training never saw (T-Maze: 100; POPGym: mean return over 50 episodes).

Every finished run is recorded at once in ``OUT.json`` (atomically, under a lock: runs in parallel processes
share it), and ``OUT.md`` / ``OUT.png`` are redrawn from it; a re-run skips the runs already recorded, so an
interrupted benchmark resumes where it stopped (a run cut off midway starts over). Example:

    python benchmarks/online_memory.py --tasks recall-60 --seeds 0 1 2 --jobs 2
"""

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sb3_elmur.common.utils import (  # noqa: E402
    code_commit, exclusive_lock, positive_int_argument, write_json_atomically, write_text_atomically,
)

TASKS: Dict[str, Dict[str, Any]] = {
    "recall-30": dict(kind="recall", delay=30, budget=150_000),
    "recall-60": dict(kind="recall", delay=60, budget=150_000),
    "recall-120": dict(kind="recall", delay=120, budget=300_000),
    "recall-250": dict(kind="recall", delay=250, budget=500_000),
    "tmaze-100": dict(kind="tmaze", corridor=100, budget=500_000, ppo=dict(n_steps=64)),
    "RepeatFirstMedium": dict(kind="popgym", env_id="popgym-RepeatFirstMedium-v0", budget=300_000),
    "CountRecallMedium": dict(kind="popgym", env_id="popgym-CountRecallMedium-v0", budget=300_000),
}
POLICIES = {
    "ElmurPPO": ("ElmurPPO", "ElmurPolicy"),
    "RecurrentPPO+ElmurPolicy": ("RecurrentPPO", "ElmurPolicy"),
    "RecurrentPPO+MlpLstmPolicy": ("RecurrentPPO", "MlpLstmPolicy"),
}
LSTM = "RecurrentPPO+MlpLstmPolicy"
TARGET = 0.9
N_ENVS = 8
EVAL_SEED = 10_000  # evaluation episodes come from seeds EVAL_SEED + seed, never used in training


def make_env(task: Dict[str, Any], n_envs: int, seed: int, env_kwargs: Optional[Dict[str, Any]] = None):
    from stable_baselines3.common.vec_env import VecMonitor

    env_kwargs = env_kwargs or {}
    if task["kind"] == "recall":
        from sb3_elmur.envs.recall import NoisyRecallVecEnv

        delay = task["delay"]
        return VecMonitor(NoisyRecallVecEnv(n_envs, n_cues=3, length=(delay - 5, delay + 5), noise_dims=2, seed=seed,
                                            **env_kwargs))
    if task["kind"] == "tmaze":
        from sb3_elmur.envs import TMazeVecEnv

        return VecMonitor(TMazeVecEnv(n_envs, corridor_length=task["corridor"], variant="passive", seed=seed, **env_kwargs))
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_elmur.envs.popgym import make_popgym_env

    return make_vec_env(make_popgym_env, n_envs=n_envs, seed=seed, env_kwargs=dict(env_id=task["env_id"], **env_kwargs))


def evaluate(model: Any, task: Dict[str, Any], seed: int) -> float:
    """Greedy success (recall, T-Maze) or mean episode return (POPGym) on evaluation seeds."""
    from sb3_elmur.common.evaluation import evaluate_success
    from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze

    if task["kind"] == "recall":
        return evaluate_success(model, make_env(task, 200, EVAL_SEED + seed).venv, task["delay"] + 10)
    if task["kind"] == "tmaze":
        return evaluate_tmaze(model, task["corridor"], n_episodes=100, seed=EVAL_SEED + seed)
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_env(task, 10, EVAL_SEED + seed)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=50, deterministic=True)
    env.close()
    return float(mean)


def run_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train and evaluate one (task, label, seed); returns its record."""
    import torch

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback

    from sb3_elmur import ElmurPPO

    task = TASKS[job["task"]]
    algo, policy = POLICIES[job["policy"]]
    ppo = {**task.get("ppo", {}), **job["ppo_kwargs"]}
    env = make_env(task, N_ENVS, job["seed"], job.get("env_kwargs"))
    cls = ElmurPPO if algo == "ElmurPPO" else RecurrentPPO
    model = cls(policy, env, seed=job["seed"], policy_kwargs=job["policy_kwargs"] or None, **ppo)
    curve: List[List[float]] = []
    clock = {"eval": 0.0}

    class Evaluate(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next = job["eval_every"]

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += job["eval_every"]
                began = time.perf_counter()
                curve.append([self.num_timesteps, evaluate(model, task, job["seed"])])
                clock["eval"] += time.perf_counter() - began
                print(f"{job['task']} {job['label']} seed {job['seed']}: {self.num_timesteps} steps, "
                      f"{curve[-1][1]:.3f}", flush=True)
            return True

    class UnfreezeBackbone(BaseCallback):
        """A frozen backbone (``freeze_backbone``) starts training after the rollout that reaches ``at`` env steps:
        its parameters get gradients again and one Adam takes all the policy's parameters (new moments)."""

        def __init__(self, at: int) -> None:
            super().__init__()
            self.at = at

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            policy = self.model.policy
            if policy.freeze_backbone and self.num_timesteps >= self.at:
                for backbone in (policy.lstm_actor, policy.lstm_critic):
                    if backbone is not None:
                        backbone.requires_grad_(True)
                policy.freeze_backbone = False
                lr = policy.optimizer.param_groups[0]["lr"]
                policy.optimizer = policy.optimizer_class(policy.parameters(), lr=lr, **policy.optimizer_kwargs)
                print(f"{job['task']} {job['label']} seed {job['seed']}: backbone trains from {self.num_timesteps} "
                      "steps", flush=True)

    callbacks: List[BaseCallback] = [Evaluate()]
    if job.get("unfreeze_backbone_at") is not None:  # main() has checked that the backbone starts frozen
        callbacks.append(UnfreezeBackbone(job["unfreeze_backbone_at"]))
    began = time.perf_counter()
    model.learn(job["budget"], callback=callbacks)
    wall = time.perf_counter() - began
    reached = [steps for steps, value in curve if value >= TARGET]
    return {
        "task": job["task"], "label": job["label"], "policy": job["policy"], "seed": job["seed"],
        "ppo_kwargs": job["ppo_kwargs"], "policy_kwargs": job["policy_kwargs"], "env_kwargs": job.get("env_kwargs", {}),
        "unfreeze_backbone_at": job.get("unfreeze_backbone_at"), "budget": job["budget"],
        "curve": curve, "final": curve[-1][1] if curve else None, "steps_to_target": reached[0] if reached else None,
        "train_steps_per_s": model.num_timesteps / max(wall - clock["eval"], 1e-9), "wall_s": wall,
    }


def record(out: Path, result: Dict[str, Any], header: Dict[str, Any]) -> None:
    """Add ``result`` to ``OUT.json`` under a lock and redraw the report."""
    with exclusive_lock(out.with_suffix(".lock"), wait=True):  # runs in parallel processes take turns
        data = load(out)
        data["runs"] = [r for r in data["runs"] if key(r) != key(result)] + [{**result, **header}]
        write_json_atomically(out.with_suffix(".json"), data)
        report(out, data)


def load(out: Path) -> Dict[str, Any]:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def key(run: Dict[str, Any]) -> tuple:
    return run["task"], run["label"], run["seed"], run["budget"]


def _stats(values: List[float]) -> str:
    return f"{np.mean(values):.2f} +- {np.std(values):.2f}" if values else "-"


def report(out: Path, data: Dict[str, Any]) -> None:
    runs = data["runs"]
    lines = ["# Online memory at the defaults (benchmarks/online_memory.py)", "",
             f"Each row: {N_ENVS} envs, mean +- std over seeds. Success: greedy, on evaluation seeds the training never "
             f"saw (POPGym: mean return). Steps to {TARGET}: the first evaluation at or above it (runs that reached it "
             "/ runs). Env steps/s: training wall time without the evaluations, runs sharing 2 cores.", ""]
    for task in TASKS:
        task_runs = [r for r in runs if r["task"] == task]
        if not task_runs:
            continue
        budgets = sorted({r["budget"] for r in task_runs})
        lines += [f"## {task} (budget {', '.join(f'{b:,}' for b in budgets)} env steps)", "",
                  "| policy | seeds | final | best | steps to 0.9 | env steps/s | x LSTM |", "|---|---|---|---|---|---|---|"]
        lstm_speed = [r["train_steps_per_s"] for r in task_runs if r["label"] == LSTM]
        for label, budget in dict.fromkeys((r["label"], r["budget"]) for r in task_runs):
            rs = sorted((r for r in task_runs if (r["label"], r["budget"]) == (label, budget)), key=lambda r: r["seed"])
            reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            speed = [r["train_steps_per_s"] for r in rs]
            ratio = f"{np.mean(speed) / np.mean(lstm_speed):.2f}" if lstm_speed else "-"
            best = [max(v for _, v in r["curve"]) for r in rs if r["curve"]]
            name = f"{label}, {budget:,}" if len(budgets) > 1 else label  # one label at two budgets: two rows
            lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {_stats([r['final'] for r in rs])} | "
                         f"{_stats(best)} | {(f'{np.mean(reached):,.0f}' if reached else 'never')} "
                         f"({len(reached)}/{len(rs)}) | {np.mean(speed):,.0f} | {ratio} |")
        lines.append("")
    lines += ["Runs by label: settings beyond the defaults, then each command with the code's commit and the date.", ""]
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        env_kwargs = f", env {rs[0]['env_kwargs']}" if rs[0].get("env_kwargs") else ""
        unfreeze = (f", backbone trains from {rs[0]['unfreeze_backbone_at']:,} env steps"
                    if rs[0].get("unfreeze_backbone_at") is not None else "")
        lines.append(f"- {label}: ppo {rs[0]['ppo_kwargs'] or '{}'}, policy {rs[0]['policy_kwargs'] or '{}'}{env_kwargs}"
                     f"{unfreeze}")
        for command, commit, day in dict.fromkeys((r["command"], r["commit"], r["date"]) for r in rs):
            lines.append(f"  - `{command}` ({commit}, {day})")
    write_text_atomically(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(out, runs)


def plot(out: Path, runs: List[Dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        budgets = {r["budget"] for r in runs if r["task"] == task}
        for label, budget in dict.fromkeys((r["label"], r["budget"]) for r in runs if r["task"] == task):
            curves = [r["curve"] for r in runs if r["task"] == task and (r["label"], r["budget"]) == (label, budget)
                      and r["curve"]]
            name = f"{label}, {budget:,}" if len(budgets) > 1 else label
            n = min(len(c) for c in curves)
            steps = np.array([s for s, _ in curves[0][:n]])
            values = np.array([[v for _, v in c[:n]] for c in curves])
            ax.plot(steps, values.mean(0), label=f"{name} ({len(curves)})")
            ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy success" if TASKS[task]["kind"] != "popgym" else "mean return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path.with_suffix(".tmp.png"), dpi=90)
    os.replace(path.with_suffix(".tmp.png"), path)
    plt.close(fig)


def _run_and_record(args: tuple) -> Optional[str]:
    job, out, header = args
    try:
        record(out, run_one(job), header)
    except Exception as error:  # one failed run must not stop the others; it is reported and not recorded
        return f"{key(job)}: {type(error).__name__}: {error}"
    return None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/online_memory.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                        help="Tasks to run.")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                        help="Algorithm + policy pairs to run.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="Training seeds, one run each per task and policy.")
    parser.add_argument("--label", default=None, help="Name of these runs in the report (None: the policy's "
                        "name). Required with --ppo-kwargs or --policy-kwargs, which go under a label of their own.")
    parser.add_argument("--ppo-kwargs", type=json.loads, default={}, help="Algorithm settings beyond the defaults, as JSON.")
    parser.add_argument("--policy-kwargs", type=json.loads, default={}, help="Policy settings beyond the defaults, as JSON.")
    parser.add_argument("--env-kwargs", type=json.loads, default={},
                        help="Training env settings beyond the task's, as JSON (for example terminate_on_timeout).")
    parser.add_argument("--unfreeze-backbone-at", type=positive_int_argument, default=None,
                        help="Diagnosis: with --policy-kwargs '{\"freeze_backbone\": true}', the backbone starts "
                        "training after the rollout that reaches this many env steps.")
    parser.add_argument("--eval-every", type=positive_int_argument, default=25_000,
                        help="Env steps between evaluations.")
    parser.add_argument("--budget", type=positive_int_argument, default=None,
                        help="Env steps per run, for every task (None: each task's own budget).")
    parser.add_argument("--jobs", type=positive_int_argument, default=2,
                        help="Runs in parallel, one process and one torch thread each.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "online_memory",
                        help="Results path without suffix: OUT.json, OUT.md and OUT.png.")
    args = parser.parse_args(argv)
    for name in ("ppo_kwargs", "policy_kwargs", "env_kwargs"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    if args.unfreeze_backbone_at is not None and not args.policy_kwargs.get("freeze_backbone"):
        parser.error("--unfreeze-backbone-at needs --policy-kwargs '{\"freeze_backbone\": true}'")
    if (args.ppo_kwargs or args.policy_kwargs or args.env_kwargs) and not args.label:
        parser.error("--ppo-kwargs, --policy-kwargs and --env-kwargs need a --label (runs at the defaults keep the "
                     "policy's name)")
    if args.label and len(args.policies) != 1:
        parser.error("--label names the runs of one policy: give one --policies")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {key(r) for r in load(args.out)["runs"]}
    jobs = [dict(task=task, policy=policy, label=args.label or policy, seed=seed, ppo_kwargs=args.ppo_kwargs,
                 policy_kwargs=args.policy_kwargs, env_kwargs=args.env_kwargs, eval_every=args.eval_every,
                 unfreeze_backbone_at=args.unfreeze_backbone_at, budget=args.budget or TASKS[task]["budget"])
            for seed in args.seeds for task in args.tasks for policy in args.policies]
    todo = [job for job in jobs if key(job) not in done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already recorded in {args.out.with_suffix('.json')}; "
          f"running {len(todo)}, {args.jobs} at a time", flush=True)
    header = {"commit": code_commit(Path(__file__).parent), "date": date.today().isoformat(),
              "command": "python benchmarks/online_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        failures = [f for f in pool.imap_unordered(_run_and_record, [(j, args.out, header) for j in todo]) if f]
    for failure in failures:
        print("failed (not recorded):", failure, file=sys.stderr)
    print(f"report: {args.out.with_suffix('.md')}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
