"""RecurrentPPO with ElmurPolicy versus MlpLstmPolicy on the passive T-Maze: success, speed and memory.

Both policies get the same env-step budget, seeds and PPO settings, at a similar parameter count. Each run is
a subprocess (so peak memory is its own) that writes a JSON file in ``--out`` (``runs/tmaze_vs_lstm``: git-ignored);
finished runs are skipped, so a long benchmark can be split across sessions. The report is rebuilt from all of
them: ``--report``.md (the table, with the command, commit, machine and date), .png (learning curves) and .json
(every run's record), ``benchmarks/results/tmaze_vs_lstm.*`` by default; settings other than the defaults add a tag
of their own to the names (``tmaze_vs_lstm_<hash>.*``). An existing report is only replaced with ``--overwrite``;
``--report-only`` rewrites it from ``--out``'s records, or, in a fresh clone with none, from its .json.

    python benchmarks/tmaze_vs_lstm.py --corridors 10 30 100 300 --timesteps 500000 --seeds 0 --jobs 2
"""

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from sb3_elmur.common.utils import new_report_path, write_atomically, write_json_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import add_report_options, origin_lines, provenance, report_origin, save_report, saved_report  # noqa: E402

POLICIES = ("ElmurPolicy", "MlpLstmPolicy")
# Policy sizes at similar parameter counts: "small" is the T-Maze preset (about 43k parameters each), "large"
# the zoo configs' default (about 250k each: ELMUR 2 x 64 wide, LSTM 160 units).
SIZES = {
    "small": {"ElmurPolicy": "TMAZE_POLICY_KWARGS", "MlpLstmPolicy": "TMAZE_LSTM_POLICY_KWARGS"},
    "large": {
        "ElmurPolicy": dict(d_model=64, n_layers=2, n_heads=2, memory_size=2, context_length=10),
        "MlpLstmPolicy": dict(lstm_hidden_size=160),
    },
}


def run_one(
    policy: str, corridor: int, seed: int, timesteps: int, eval_every: int, n_envs: int, size: str,
    ppo_kwargs: Dict[str, Any], min_corridor: int,
) -> Dict[str, Any]:
    """Train one policy on corridors ``min_corridor..corridor`` (each episode draws its length; one length if
    equal) and evaluate at ``corridor`` every ``eval_every`` steps (evaluation time not counted)."""
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecMonitor

    import sb3_elmur  # noqa: F401
    from sb3_elmur.common import presets
    from sb3_elmur.envs import TMazeVecEnv
    from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    class RolloutTimer(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.rollout_time, self._start = 0.0, 0.0

        def _on_rollout_start(self) -> None:
            self._start = time.perf_counter()

        def _on_rollout_end(self) -> None:
            self.rollout_time += time.perf_counter() - self._start

        def _on_step(self) -> bool:
            return True

    lengths = (min_corridor, corridor) if 0 < min_corridor < corridor else corridor  # 0: corridor L only
    env = VecMonitor(TMazeVecEnv(n_envs, corridor_length=lengths, variant="passive", seed=seed))
    policy_kwargs = SIZES[size][policy]
    policy_kwargs = getattr(presets, policy_kwargs) if isinstance(policy_kwargs, str) else policy_kwargs
    ppo_kwargs = {**presets.TMAZE_PPO_KWARGS, **ppo_kwargs}
    model = RecurrentPPO(policy, env, policy_kwargs=policy_kwargs, seed=seed, **ppo_kwargs)
    timer = RolloutTimer()
    curve: List[List[float]] = []
    learn_time = 0.0
    while model.num_timesteps < timesteps:
        start = time.perf_counter()
        model.learn(min(eval_every, timesteps - model.num_timesteps), callback=timer, reset_num_timesteps=False)
        learn_time += time.perf_counter() - start
        curve.append([model.num_timesteps, evaluate_tmaze(model, corridor, n_episodes=100)])
        print(f"{policy} L={corridor} seed={seed} steps={model.num_timesteps} success={curve[-1][1]:.2f}", flush=True)
    steps = model.num_timesteps
    train_time = learn_time - timer.rollout_time
    return {
        "policy": policy,
        "size": size,
        "corridor": corridor,
        "min_corridor": min_corridor,  # as requested (0: none)
        "ppo_kwargs": ppo_kwargs,
        "seed": seed,
        "timesteps": steps,
        "n_envs": n_envs,
        "parameters": sum(p.numel() for p in model.policy.parameters()),
        "success": curve[-1][1],
        "curve": curve,
        "rollout_steps_per_s": steps / timer.rollout_time,
        "train_steps_per_s": steps / train_time,
        "total_steps_per_s": steps / learn_time,
        "train_share": train_time / learn_time,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **provenance(),
    }


def write_report(results: List[Dict[str, Any]], report: Path, origin: Dict[str, str]) -> None:
    """``report``.md (one row per policy and corridor, mean over seeds), .png (learning curves) and .json (every
    run's record); ``origin``: the command, commit, machine and date the report names."""
    import numpy as np

    rows = [
        "# Passive T-Maze: ElmurPolicy vs MlpLstmPolicy (sb3-contrib RecurrentPPO)",
        "",
        *origin_lines(origin, report, accumulate=False),
        "| corridor | policy | params | seeds | final success (per seed) | best success | env steps/s rollout | "
        "train | total | train share | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["corridor"], r["policy"]) for r in results})
    for corridor, policy in keys:
        runs = sorted((r for r in results if r["corridor"] == corridor and r["policy"] == policy), key=lambda r: r["seed"])
        mean = lambda k: float(np.mean([r[k] for r in runs]))  # noqa: E731
        per_seed = ", ".join(f"{r['success']:.2f}" for r in runs)
        best = float(np.mean([max(s for _, s in r["curve"]) for r in runs]))
        rows.append(
            f"| {corridor} | {policy} | {runs[0]['parameters']:,} | {len(runs)} | {mean('success'):.2f} ({per_seed}) | "
            f"{best:.2f} | "
            f"{mean('rollout_steps_per_s'):,.0f} | {mean('train_steps_per_s'):,.0f} | {mean('total_steps_per_s'):,.0f} | "
            f"{mean('train_share'):.0%} | {mean('peak_rss_mb'):.0f} |"
        )
    # The speed target as a ratio per seed (absolute speeds follow the load of the machine, so run both side by side).
    ratios = []
    for corridor in sorted({r["corridor"] for r in results}):
        total = {(r["seed"], r["policy"]): r["total_steps_per_s"] for r in results if r["corridor"] == corridor}
        seeds = sorted({seed for seed, _ in total if all((seed, p) in total for p in POLICIES)})
        if seeds:
            per_seed = (total[seed, POLICIES[0]] / total[seed, POLICIES[1]] for seed in seeds)
            ratios.append(f"L {corridor}: " + ", ".join(f"{ratio:.2f}" for ratio in per_seed))
    if ratios:
        rows += ["", f"Total env steps/s, {POLICIES[0]} / {POLICIES[1]}, per seed: " + "; ".join(ratios) + "."]
    budget = sorted({r["timesteps"] for r in results})
    min_corridors = sorted({r["min_corridor"] for r in results if 0 < r.get("min_corridor", 0) < r["corridor"]})
    if min_corridors:
        rows += ["", f"Training corridors: every episode draws its length uniformly in {min_corridors[0]}..L "
                 "(evaluation at L)."]
    rows += ["", f"Budget: {', '.join(f'{b:,}' for b in budget)} env steps per run, 8 envs, success over 100 greedy "
             "episodes (half per cue) at the end of training (final) and at the best of the evaluations during "
             "training (best). Steps/s exclude evaluation."]
    save_report(report, origin, results, "\n".join(rows) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corridors = sorted({r["corridor"] for r in results})
    fig, axes = plt.subplots(1, len(corridors), figsize=(4 * len(corridors), 3.2), squeeze=False)
    for ax, corridor in zip(axes[0], corridors):
        for policy, color in zip(POLICIES, ("tab:blue", "tab:orange")):
            for r in (r for r in results if r["corridor"] == corridor and r["policy"] == policy):
                steps, success = zip(*r["curve"])
                ax.plot(steps, success, color=color, alpha=0.8, label=f"{policy} s{r['seed']}")
        ax.set_title(f"corridor {corridor}")
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("success")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    write_atomically(Path(f"{report}.png"), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/tmaze_vs_lstm.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--corridors", type=int, nargs="+", default=[10, 30, 100, 300], help="Corridor lengths L.")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="Policies to run.")
    parser.add_argument("--size", default="small", choices=list(SIZES), help="Policy sizes (see SIZES in this script).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds, one run each.")
    parser.add_argument("--timesteps", type=int, default=500_000, help="Env-step budget per run.")
    parser.add_argument("--eval-every", type=int, default=25_000, help="Env steps between two evaluations.")
    parser.add_argument("--n-envs", type=int, default=8, help="Parallel T-Maze envs per run.")
    parser.add_argument("--ppo-kwargs", default="{}", help="JSON merged over presets.TMAZE_PPO_KWARGS.")
    parser.add_argument("--min-corridor", type=int, default=0,
                        help="Train on corridors drawn in MIN..L and evaluate at L (0: L only).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one core each).")
    add_report_options(parser, "runs/tmaze_vs_lstm", "benchmarks/results/tmaze_vs_lstm",
                       "Folder of the run records (resumable).",
                       "Report path without suffix (and tag): REPORT.md (table), REPORT.png, REPORT.json (runs).")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON to this path
    args = parser.parse_args()
    runs_dir = Path(args.out)

    if args.run:
        policy, corridor, seed = args.policies[0], args.corridors[0], args.seeds[0]
        result = run_one(policy, corridor, seed, args.timesteps, args.eval_every, args.n_envs, args.size,
                         json.loads(args.ppo_kwargs), args.min_corridor)
        write_json_atomically(Path(args.run), result)
        return

    # Runs with other settings than the defaults get a tag of their own, so that results never mix.
    settings = dict(size=args.size, ppo_kwargs=_ppo_overrides(json.loads(args.ppo_kwargs)), min_corridor=args.min_corridor)
    tag = "" if settings == dict(size="small", ppo_kwargs={}, min_corridor=0) else "_" + hashlib.sha1(
        json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    report = Path(f"{args.report}{tag}")
    new_report_path(parser, f"{report}.md", args.overwrite)
    saved = saved_report(report)
    if args.report_only and not list(runs_dir.glob(f"*{tag}.json")):
        if saved is None:
            parser.error(f"--report-only: no records in {runs_dir} and no {report}.json")
        write_report(saved["runs"], report, report_origin(parser, saved))
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    for corridor in args.corridors:
        for policy in args.policies:
            for seed in args.seeds:
                path = runs_dir / f"{policy}_L{corridor}_s{seed}_{args.timesteps}{tag}.json"
                if not path.exists() and not args.report_only:
                    pending.append((policy, corridor, seed, path))
    running: List[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            policy, corridor, seed, path = pending.pop(0)
            cmd = [sys.executable, __file__, "--run", str(path), "--policies", policy, "--corridors", str(corridor),
                   "--seeds", str(seed), "--timesteps", str(args.timesteps), "--eval-every", str(args.eval_every),
                   "--n-envs", str(args.n_envs), "--out", str(runs_dir), "--size", args.size,
                   "--ppo-kwargs", args.ppo_kwargs, "--min-corridor", str(args.min_corridor)]
            running.append(subprocess.Popen(cmd))
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode != 0:
                raise RuntimeError(f"run failed: {' '.join(proc.args)}")

    results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob(f"*{tag}.json"))]
    results = [
        r for r in results
        if r["corridor"] in args.corridors and r["timesteps"] >= args.timesteps
        and dict(size=r.get("size", "small"), ppo_kwargs=_ppo_overrides(r.get("ppo_kwargs", {})),
                 min_corridor=r.get("min_corridor", 0)) == settings
    ]
    origin = report_origin(parser, saved if args.report_only else None)
    write_report(results, report, origin)


def _ppo_overrides(ppo_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The PPO kwargs that differ from presets.TMAZE_PPO_KWARGS."""
    from sb3_elmur.common import presets

    return {k: v for k, v in ppo_kwargs.items() if presets.TMAZE_PPO_KWARGS.get(k) != v}


if __name__ == "__main__":
    main()
