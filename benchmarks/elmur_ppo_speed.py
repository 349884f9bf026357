"""Speed and memory of ElmurPPO against RecurrentPPO with ElmurPolicy and with MlpLstmPolicy, in one run.

    python benchmarks/elmur_ppo_speed.py --rounds 3 --out benchmarks/results/elmur_ppo_speed.md

Every configuration trains in its own subprocess (so that peak memory is its own) for ``--rollouts`` rollouts
of 8 envs x 128 steps, each algorithm at its defaults (epochs: ElmurPPO 6, RecurrentPPO 10), after one rollout of
warm-up (which also holds the compiling of "compiled acting"); rounds alternate the configurations so that
load from other jobs weighs on all alike. It reports env steps/s in rollouts, in training and in total (median
over rounds), the ratios to the LSTM, bytes of recurrent state the buffer stores per env step (from the buffer's
own arrays), and peak resident memory.
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List

from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.utils import code_commit, new_report_path, write_json_atomically, write_text_atomically

# name -> (algorithm, policy, policy_kwargs, algorithm kwargs): the package defaults, and an LSTM of a similar
# parameter count. The last six ElmurPPO ones (not run by default) measure shorter and longer sequences and the
# memory horizon's cost.
CONFIGS = {
    "ElmurPPO": ("ElmurPPO", "ElmurPolicy", {}, {}),
    "ElmurPPO, compiled acting": ("ElmurPPO", "ElmurPolicy", {}, {"compile_acting": True}),
    "RecurrentPPO + ElmurPolicy": ("RecurrentPPO", "ElmurPolicy", {}, {}),
    "RecurrentPPO + MlpLstmPolicy": ("RecurrentPPO", "MlpLstmPolicy", {}, {}),
    "RecurrentPPO + MlpLstmPolicy (similar size)": ("RecurrentPPO", "MlpLstmPolicy", {"lstm_hidden_size": 160}, {}),
    "ElmurPPO, sequences 16": ("ElmurPPO", "ElmurPolicy", {}, {"sequence_length": 16}),
    "ElmurPPO, memory horizon 0": ("ElmurPPO", "ElmurPolicy", {}, {"memory_horizon": 0}),
    "ElmurPPO, sequences 128, horizon 64": ("ElmurPPO", "ElmurPolicy", {}, {"sequence_length": 128, "memory_horizon": 64}),
    "ElmurPPO, sequences 32, horizon 16": ("ElmurPPO", "ElmurPolicy", {}, {"sequence_length": 32, "memory_horizon": 16}),
    "ElmurPPO, sequences 128, horizon 128": ("ElmurPPO", "ElmurPolicy", {}, {"sequence_length": 128, "memory_horizon": 128}),
    "ElmurPPO, sequences 32, horizon 128": ("ElmurPPO", "ElmurPolicy", {}, {"sequence_length": 32, "memory_horizon": 128}),
}
DEFAULT_CONFIGS = list(CONFIGS)[:5]
ENVS = ("sb3_elmur/PassiveTMaze-v0", "popgym-RepeatPreviousEasy-v0", "popgym-CountRecallEasy-v0")
LSTM = "RecurrentPPO + MlpLstmPolicy"


def measure(config: str, env_id: str, rollouts: int, n_envs: int, seed: int) -> Dict[str, Any]:
    """Train one configuration in this process; :return: its timings and sizes."""
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_elmur
    from sb3_elmur.envs import TMazeVecEnv
    from sb3_elmur.envs.popgym import make_popgym_env

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    algo_name, policy, policy_kwargs, algo_kwargs = CONFIGS[config]
    if env_id == "sb3_elmur/PassiveTMaze-v0":
        env = TMazeVecEnv(n_envs, corridor_length=100, variant="passive", seed=seed)
    else:
        env = make_vec_env(lambda: make_popgym_env(env_id), n_envs=n_envs, seed=seed)
    algo = sb3_elmur.ElmurPPO if algo_name == "ElmurPPO" else RecurrentPPO
    model = algo(policy, env, policy_kwargs=policy_kwargs, seed=seed, device="cpu", **algo_kwargs)

    class Clock(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: List[tuple] = []

        def _on_step(self) -> bool:
            return True

        def _on_rollout_start(self) -> None:
            self.marks.append(("start", time.perf_counter()))

        def _on_rollout_end(self) -> None:
            self.marks.append(("end", time.perf_counter()))

    # The shape of every segment-parallel training pass (rows x segments of the grid, see ElmurModel._plan): the
    # segments run one after another, so they, more than the rows, set a pass's cost.
    grids: List[tuple] = []

    def record_grid(module, args) -> None:
        x, state, starts = args
        if torch.is_grad_enabled() and x.shape[1] > 1:
            grids.append((x.shape[0], module._plan(state.step, starts.bool()).reset.shape[1]))

    elmur = getattr(getattr(model.policy, "lstm_actor", None), "model", None)
    if elmur is not None:
        elmur.register_forward_pre_hook(record_grid)

    clock = Clock()
    steps_per_rollout = model.n_steps * n_envs
    model.learn((rollouts + 1) * steps_per_rollout, callback=clock)
    finished = time.perf_counter()
    times = [t for _, t in clock.marks] + [finished]  # start, end, start, end, ..., end of the last training
    rollout_s = sum(times[2 * i + 1] - times[2 * i] for i in range(1, rollouts + 1))
    train_s = sum(times[2 * i + 2] - times[2 * i + 1] for i in range(1, rollouts + 1))
    buffer = model.rollout_buffer
    if algo_name == "ElmurPPO":
        state_bytes = buffer.state_nbytes()
    else:
        state_bytes = sum(getattr(buffer, name).nbytes for name in
                          ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf"))
    n = rollouts * steps_per_rollout
    return {
        "rollout_steps_per_s": n / rollout_s,
        "train_steps_per_s": n / train_s,
        "total_steps_per_s": n / (rollout_s + train_s),
        "state_bytes_per_step": state_bytes / steps_per_rollout,
        "parameters": sum(p.numel() for p in model.policy.parameters()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_epochs": model.n_epochs,
        "grid_rows": statistics.mean(r for r, _ in grids) if grids else None,
        "grid_segments": statistics.mean(s for _, s in grids) if grids else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/elmur_ppo_speed.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds over all configurations.")
    parser.add_argument("--rollouts", type=int, default=2, help="Timed rollouts (and updates) per measurement.")
    parser.add_argument("--n-envs", type=int, default=8, help="Parallel envs.")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), help="Env ids to measure on.")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS), metavar="CONFIG",
                        help="Configurations to measure (the LSTM one is always measured: ratios refer to it).")
    parser.add_argument("--out", default="benchmarks/results/elmur_ppo_speed.md", help="Markdown report to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child[0], args.child[1], args.rollouts, args.n_envs, seed=0)))
        return

    out = new_report_path(parser, args.out, args.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the measurements
    configs = [c for c in CONFIGS if c in args.configs or c == LSTM]
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {env: {c: [] for c in configs} for env in args.envs}
    for round_index in range(args.rounds):
        for env_id in args.envs:
            for config in configs:
                command = [sys.executable, __file__, "--child", config, env_id, "--rollouts", str(args.rollouts),
                           "--n-envs", str(args.n_envs)]
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                runs[env_id][config].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"round {round_index + 1}/{args.rounds} {env_id} {config}: {runs[env_id][config][-1]}", flush=True)

    command = f"python benchmarks/elmur_ppo_speed.py --rounds {args.rounds} --rollouts {args.rollouts} --n-envs {args.n_envs}"
    if args.envs != list(ENVS):
        command += " --envs " + " ".join(args.envs)
    if configs != DEFAULT_CONFIGS:
        command += " --configs " + " ".join(f"'{c}'" for c in configs)
    lines = [
        "# ElmurPPO: speed and memory against RecurrentPPO",
        "",
        f"Command: `{command}` (commit {code_commit(Path(__file__).parent)}, {date.today().isoformat()}; "
        f"{platform.machine()}, Python {platform.python_version()}, one torch thread per process, CPU). "
        f"{args.n_envs} envs x 128 steps per rollout, minibatches of 128 steps, each algorithm at its defaults "
        "(epochs in the table), default policy configs (ELMUR: "
        f"{ElmurConfig().describe()}; ElmurPPO: its defaults, sequences and memory horizon of n_steps, 128). Env "
        "steps/s: median over rounds; x LSTM: ratio to "
        f"`{LSTM}` (256 units) in the same run. State bytes: recurrent state stored per env step (ElmurPPO: "
        "anchors, their index and the history's observations; RecurrentPPO: the packed (hidden, cell) pairs of "
        "actor and critic). Peak RSS: the whole process, torch included. Training grid: mean rows x segments of "
        "ELMUR's segment-parallel training passes (segments run one after another; rows side by side).",
        "",
    ]
    for env_id in args.envs:
        median = {c: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
                  for c, rs in runs[env_id].items()}
        lines += [f"## {env_id}" + (" (corridor 100)" if "TMaze" in env_id else ""), "",
                  "| configuration | parameters | epochs | rollout steps/s | train steps/s | total steps/s | total x LSTM | "
                  "rollout x LSTM | state bytes/step | peak RSS MiB | training grid |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for config, m in median.items():
            grid = "-" if m.get("grid_rows") is None else f"{m['grid_rows']:.1f} x {m['grid_segments']:.1f}"
            lines.append(
                f"| {config} | {m['parameters']:,.0f} | {m['n_epochs']:.0f} | {m['rollout_steps_per_s']:,.0f} | {m['train_steps_per_s']:,.0f} | "
                f"{m['total_steps_per_s']:,.0f} | {m['total_steps_per_s'] / median[LSTM]['total_steps_per_s']:.2f} | "
                f"{m['rollout_steps_per_s'] / median[LSTM]['rollout_steps_per_s']:.2f} | "
                f"{m['state_bytes_per_step']:,.0f} | {m['peak_rss_mib']:,.0f} | {grid} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_text_atomically(out, text)
    write_json_atomically(out.with_suffix(".json"), {"command": command, "runs": runs})


if __name__ == "__main__":
    main()
