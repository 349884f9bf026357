"""POPGym offline, the paper's protocol on our machines: behaviour cloning (RecurrentBC) of a trained agent's episodes
on six POPGym tasks, ElmurPolicy against the BC-LSTM (MlpLstmPolicy) at the same budget, 3 seeds, mean return.

    python benchmarks/popgym_offline.py --seeds 0 1 2

The experts are ElmurPPO agents trained as in the POPGym comparison (``benchmarks/results/popgym``): seed 0 of
each task, 100k env steps, ``presets.POPGYM_POLICY_KWARGS`` and ``POPGYM_PPO_KWARGS`` with ElmurPPO's defaults when
the first experts were trained (``EXPERT_PPO_KWARGS``, ``EXPERT_POLICY_KWARGS``), saved by ``sb3_elmur.compare``
as ``<runs>/<task>/ElmurPPO-ElmurPolicy/seed0_model.zip``. Models are not committed: an expert that is missing is
trained first, by ``python -m sb3_elmur.compare ... --out runs/popgym`` (``--runs`` is that folder's ``runs``;
about 2-7 min per task on one core, ``--jobs`` at a time). Each task's dataset is the expert's greedy episodes,
recorded with ``sb3_elmur.datasets.collect_episodes``; both policies train on the same windows (5 segments of 20
steps) with the same learning rate, batch and number of gradient steps, and are evaluated on 100 greedy episodes.
Every (task, policy, seed) trains once and is evaluated once (models and records in ``--out``, under ``runs/``:
git-ignored), so the run can be split across sessions. The report is rebuilt from every record in ``--out``:
``--report``.md (the table, with the command, commit, machine and date) and ``--report``.json (each run's record),
``benchmarks/results/popgym_offline.*`` by default, which an existing report only replaces with ``--overwrite``.
``--report-only`` rewrites it from ``--out``'s records, or, in a fresh clone with none, from ``--report``.json.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

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
    new_report_path,
    refuse_record_problems,
    train_and_evaluate_once,
    write_json_atomically,
)
from sb3_elmur.compare.report import verdict
from sb3_elmur.envs.popgym import make_popgym_env

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import (  # noqa: E402
    add_report_options, learn_and_save, origin_lines, records_folder, report_origin, rewrite_report, save_report,
)

TASKS = ["popgym-RepeatPreviousEasy-v0", "popgym-CountRecallEasy-v0", "popgym-AutoencodeEasy-v0",
         "popgym-PositionOnlyCartPoleEasy-v0", "popgym-HigherLowerEasy-v0", "popgym-ConcentrationEasy-v0"]
# name: (policy, policy kwargs): the sizes of the online comparison (about the same parameter count)
CONFIGS: Dict[str, Any] = {
    "ElmurPolicy": ("ElmurPolicy", presets.POPGYM_POLICY_KWARGS),
    "MlpLstmPolicy": ("MlpLstmPolicy", presets.POPGYM_LSTM_POLICY_KWARGS),
}
EVAL_EPISODES = 100
TIE = 0.01  # mean returns this close are a tie: 0.005 of POPGym's normalised score (0.5 * return + 0.5)
# The experts' training: the POPGym comparison's ElmurPPO runs (README), seed 0; PPO kwargs over compare's defaults
# (presets.TMAZE_PPO_KWARGS), which make presets.POPGYM_PPO_KWARGS with ElmurPPO's defaults of then (sequences of
# 32, a horizon of 16, GAE lambda 0.95, advantages normalised; the read initialised at std 0.02), so that an expert
# trained today is trained as the first ones were.
EXPERT_LABEL = "ElmurPPO-ElmurPolicy"
EXPERT_TIMESTEPS = 100_000
EXPERT_PPO_KWARGS: Dict[str, Any] = {"learning_rate": presets.POPGYM_PPO_KWARGS["learning_rate"],
                                     "sequence_length": 32, "memory_horizon": 16, "gae_lambda": 0.95,
                                     "normalize_advantage": True}
EXPERT_POLICY_KWARGS: Dict[str, Any] = {**presets.POPGYM_POLICY_KWARGS, "read_init_std": 0.02}
# The records in --out: one expert record per task folder that holds runs (``<task>/<name>_s<seed>.json`` beside it)
RECORDS = "*/expert.json"


def expert_path(runs: Path, task: str) -> Path:
    return runs / task / EXPERT_LABEL / "seed0_model.zip"


def train_experts(tasks: List[str], runs: Path, jobs: int) -> None:
    """Train the missing experts of ``tasks`` with ``sb3_elmur.compare`` into ``runs.parent`` (it writes
    ``<out>/runs``); finished runs there are skipped, unfinished ones resumed."""
    missing = [task for task in tasks if not expert_path(runs, task).exists()]
    if not missing:
        return
    if runs.name != "runs":
        sys.exit(f"experts missing in {runs}, which is not a comparison's runs folder (<out>/runs) to train them into")
    compare = [sys.executable, "-m", "sb3_elmur.compare", "--envs", *missing, "--policies", "ElmurPPO:ElmurPolicy",
               "--policy-kwargs", f"{EXPERT_LABEL}={json.dumps(EXPERT_POLICY_KWARGS)}",
               "--ppo-kwargs", json.dumps(EXPERT_PPO_KWARGS), "--seeds", "0", "--timesteps", str(EXPERT_TIMESTEPS),
               "--jobs", str(jobs), "--out", str(runs.parent)]
    print("training the missing experts:", " ".join(shlex.quote(arg) for arg in compare), flush=True)
    subprocess.run(compare, check=True)
    still = [task for task in missing if not expert_path(runs, task).exists()]
    if still:
        sys.exit(f"the comparison ended without the experts of {still} (see {runs.parent})")


def expert_dataset(task: str, runs: Path, out: Path, n_episodes: int) -> EpisodeDataset:
    """The expert's greedy episodes of ``task`` (its return kept in ``<out>/<task>/expert.json``)."""
    path = expert_path(runs, task)
    expert = ElmurPPO.load(path, device="cpu")
    start = time.perf_counter()
    dataset = collect_episodes(expert, make_popgym_env(task), n_episodes, deterministic=True, seed=0)
    returns = [float(episode.rewards.sum()) for episode in dataset.episodes]
    write_json_atomically(out / task / "expert.json", {
        "expert": str(path), "episodes": n_episodes, "steps": dataset.n_steps,
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
    parser.add_argument("--runs", default="runs/popgym/runs",
                        help="Folder of the experts' runs: a comparison's <out>/runs; missing experts are trained there "
                             "first (sb3_elmur.compare, 100k env steps each, about 2-7 min on one core).")
    parser.add_argument("--jobs", type=int, default=1, help="Experts trained at a time when some are missing.")
    add_report_options(parser, "runs/popgym_offline", "benchmarks/results/popgym_offline")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    if args.report_only:
        rewrite_report(parser, args, write_report, RECORDS)
        return
    out, report = Path(args.out), Path(args.report)
    settings = {"gradient_steps": args.gradient_steps, "episodes": args.episodes}
    refuse_record_problems(parser, [(out / task, f"{name}_s{seed}") for task in args.tasks for name in args.configs
                                    for seed in args.seeds], settings)
    new_report_path(parser, f"{report}.md", args.overwrite)
    # An expert is needed wherever a model is still to be trained (its dataset is collected then)
    train_experts([task for task in args.tasks if any(not (out / task / f"{name}_s{seed}.zip").exists()
                                                      for name in args.configs for seed in args.seeds)],
                  Path(args.runs), args.jobs)

    for task in args.tasks:
        (out / task).mkdir(parents=True, exist_ok=True)
        datasets: List[EpisodeDataset] = []  # collected when a model first needs it

        def train(policy_name: str, seed: int, path: Path) -> Dict[str, Any]:
            if not datasets:
                datasets.append(expert_dataset(task, Path(args.runs), out, args.episodes))
            policy, policy_kwargs = CONFIGS[policy_name]
            model = RecurrentBC(policy, make_popgym_env(task), datasets[0], learning_rate=1e-3, batch_size=32,
                                sections=5, context_length=20, policy_kwargs=policy_kwargs, seed=seed)
            return learn_and_save(model, args.gradient_steps, path)

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

    write_report(out, report, None, report_origin(parser))


def write_report(out: Path, report: Path, saved: Optional[Dict[str, Any]], origin: Dict[str, str]) -> None:
    """``report``.md (:func:`table`) and .json (every record: ``<task>/<name>_s<seed>`` and ``<task>/expert``) from
    the records in ``out`` (or ``saved``'s); ``origin``: the command, commit, machine and date the report names."""
    with records_folder(out, saved, RECORDS) as folder:
        text = table(folder, origin, report.name)
        runs = {path.relative_to(folder).with_suffix("").as_posix(): json.loads(path.read_text())
                for path in sorted(folder.glob("*/*.json"))}
    save_report(report, origin, runs, text)


def table(out: Path, origin: Dict[str, str], name: str) -> str:
    """The table of every record in ``out``: per task and policy, mean and std over seeds of the mean return."""
    lines = [
        "# POPGym offline: RecurrentBC, ElmurPolicy against BC-LSTM",
        "",
        *origin_lines(origin, name),
        "Return: mean over the seeds (± std over seeds) of each model's mean return on 100 greedy episodes; expert: "
        "the mean return of its dataset.",
        "",
        f"ELMUR against BC-LSTM: means within {TIE} of each other (POPGym's normalised score 0.5 * return + 0.5 "
        "within 0.005) are a tie.",
        "",
        "| task | expert | ElmurPolicy | MlpLstmPolicy | seeds | ELMUR against LSTM |",
        "|---|---:|---:|---:|---:|---|",
    ]
    verdicts: List[str] = []
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
        scored = "-"
        if None not in means.values():
            scored = verdict(means["ElmurPolicy"] - means["MlpLstmPolicy"], TIE)
            verdicts.append(scored)
        lines.append(f"| {task_dir.name} | {expert['mean_return']:.3f} | {cells[0]} | {cells[1]} | {'/'.join(seeds)} | "
                     f"{scored} |")
    counts = {name: verdicts.count(name) for name in ("ahead", "tie", "behind")}
    lines += ["", f"ELMUR against BC-LSTM on {len(verdicts)} task(s): ahead on {counts['ahead']}, tied on "
              f"{counts['tie']}, behind on {counts['behind']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
