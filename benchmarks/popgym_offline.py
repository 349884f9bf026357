"""POPGym offline, the paper's protocol on our machines: behaviour cloning (RecurrentBC) of a trained agent's episodes
on six POPGym tasks, ElmurPolicy against the BC-LSTM (MlpLstmPolicy) at the same budget, 3 seeds, mean return.

    python benchmarks/popgym_offline.py --seeds 0 1 2

The experts are the ElmurPPO agents of the POPGym comparison (``benchmarks/results/popgym``: seed 0 of each task,
saved as ``<runs>/<task>/ElmurPPO-ElmurPolicy/seed0_model.zip``; models are not committed, the comparison's command
in the README makes them). Each task's dataset is the expert's greedy episodes, recorded with
``sb3_elmur.datasets.collect_episodes``; both policies train on the same windows (5 segments of 20 steps) with the
same learning rate, batch and number of gradient steps, and are evaluated on 100 greedy episodes. Every (task,
policy, seed) trains once and is evaluated once (records kept), so the run can be split across sessions. The
table is written beside ``--out`` as ``<out>.md``; the committed one is ``benchmarks/results/popgym_offline.md``.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common import presets
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import collect_episodes
from sb3_elmur.bc.datasets import EpisodeDataset
from sb3_elmur.common.utils import (
    refuse_record_problems,
    train_and_evaluate_once,
    write_json_atomically,
    write_text_atomically,
)
from sb3_elmur.envs.popgym import make_popgym_env

TASKS = ["popgym-RepeatPreviousEasy-v0", "popgym-CountRecallEasy-v0", "popgym-AutoencodeEasy-v0",
         "popgym-PositionOnlyCartPoleEasy-v0", "popgym-HigherLowerEasy-v0", "popgym-ConcentrationEasy-v0"]
# name: (policy, policy kwargs): the sizes of the online comparison (about the same parameter count)
CONFIGS: Dict[str, Any] = {
    "ElmurPolicy": ("ElmurPolicy", presets.POPGYM_POLICY_KWARGS),
    "MlpLstmPolicy": ("MlpLstmPolicy", presets.POPGYM_LSTM_POLICY_KWARGS),
}
EVAL_EPISODES = 100


def expert_dataset(task: str, runs: Path, out: Path, n_episodes: int) -> EpisodeDataset:
    """The expert's greedy episodes of ``task`` (its return kept in ``<out>/<task>/expert.json``)."""
    expert_path = runs / task / "ElmurPPO-ElmurPolicy" / "seed0_model.zip"
    if not expert_path.exists():
        sys.exit(f"{expert_path} is missing: run the README's POPGym comparison with ElmurPPO:ElmurPolicy first "
                 "(it saves each seed's model), or pass --runs")
    expert = ElmurPPO.load(expert_path, device="cpu")
    start = time.perf_counter()
    dataset = collect_episodes(expert, make_popgym_env(task), n_episodes, deterministic=True, seed=0)
    returns = [float(episode.rewards.sum()) for episode in dataset.episodes]
    write_json_atomically(out / task / "expert.json", {
        "expert": str(expert_path), "episodes": n_episodes, "steps": dataset.n_steps,
        "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
        "collect_seconds": time.perf_counter() - start,
    })
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/popgym_offline.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="POPGym ids.")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="Policies to clone.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds, one model each.")
    parser.add_argument("--episodes", type=int, default=300, help="Expert episodes per dataset.")
    parser.add_argument("--gradient-steps", type=int, default=1000, help="Gradient steps of behaviour cloning.")
    parser.add_argument("--runs", default="benchmarks/results/popgym/runs", help="Folder of the experts' runs.")
    parser.add_argument("--out", default="runs/popgym_offline",
                        help="Folder of models and records (the committed benchmarks/results/popgym_offline keeps "
                             "records without models: it cannot be resumed, only reported).")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    out = Path(args.out)
    settings = {"gradient_steps": args.gradient_steps, "episodes": args.episodes}
    refuse_record_problems(parser, [(out / task, f"{name}_s{seed}") for task in args.tasks for name in args.configs
                                    for seed in args.seeds], settings)

    for task in args.tasks:
        (out / task).mkdir(parents=True, exist_ok=True)
        datasets: List[EpisodeDataset] = []  # collected when a model first needs it

        def train(policy_name: str, seed: int, path: Path) -> Dict[str, Any]:
            if not datasets:
                datasets.append(expert_dataset(task, Path(args.runs), out, args.episodes))
            policy, policy_kwargs = CONFIGS[policy_name]
            model = RecurrentBC(policy, make_popgym_env(task), datasets[0], learning_rate=1e-3, batch_size=32,
                                sections=5, context_length=20, policy_kwargs=policy_kwargs, seed=seed)
            start = time.process_time()
            model.learn(args.gradient_steps)
            cpu_seconds = time.process_time() - start
            model.save(path)
            return {"train_cpu_seconds": cpu_seconds, "parameters": sum(p.numel() for p in model.policy.parameters())}

        def evaluate(model: RecurrentBC, n_episodes: int, seed: int) -> Dict[str, Any]:
            env = DummyVecEnv([lambda: make_popgym_env(task)] * 10)
            env.seed(1000 + seed)
            returns, _ = evaluate_policy(model, env, n_eval_episodes=n_episodes, deterministic=True,
                                         return_episode_rewards=True)
            return {"mean_return": float(np.mean(returns)), "std_return": float(np.std(returns))}

        for name in args.configs:
            for seed in args.seeds:
                train_and_evaluate_once(
                    f"{name}_s{seed}", out / task, lambda path: train(name, seed, path),
                    lambda path: RecurrentBC.load(path, device="cpu"), lambda model, n: evaluate(model, n, seed),
                    [EVAL_EPISODES], settings=settings,
                )

    write_text_atomically(out.parent / f"{out.name}.md", report(out, " ".join(sys.argv[1:])))
    print((out.parent / f"{out.name}.md").read_text())


def report(out: Path, command: str) -> str:
    """The table of every record in ``out``: per task and policy, mean and std over seeds of the mean return."""
    lines = [
        "# POPGym offline: RecurrentBC, ElmurPolicy against BC-LSTM",
        "",
        f"Command: `python benchmarks/popgym_offline.py {command}` (runs accumulate across commands)",
        "",
        "Return: mean over the seeds (± std over seeds) of each model's mean return on 100 greedy episodes; expert: "
        "the mean return of its dataset.",
        "",
        "| task | expert | ElmurPolicy | MlpLstmPolicy | seeds | ELMUR >= LSTM |",
        "|---|---:|---:|---:|---:|---|",
    ]
    wins = tasks = 0
    for task_dir in sorted(path for path in out.iterdir() if (path / "expert.json").exists()):
        expert = json.loads((task_dir / "expert.json").read_text())
        means, cells, seeds = {}, [], []
        for name in CONFIGS:
            records = sorted(task_dir.glob(f"{name}_s*.json"))
            evaluations = [json.loads(path.read_text())["evaluations"] for path in records]
            values = [done[str(EVAL_EPISODES)]["mean_return"] for done in evaluations if str(EVAL_EPISODES) in done]
            means[name] = float(np.mean(values)) if values else None
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-")
            seeds.append(str(len(values)))
        better = None if None in means.values() else means["ElmurPolicy"] >= means["MlpLstmPolicy"]
        tasks += better is not None
        wins += bool(better)
        lines.append(f"| {task_dir.name} | {expert['mean_return']:.3f} | {cells[0]} | {cells[1]} | {'/'.join(seeds)} | "
                     f"{'-' if better is None else ('yes' if better else 'no')} |")
    lines += ["", f"ELMUR >= BC-LSTM on {wins} of {tasks} tasks."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
