"""Why ELMUR's eager rollout step is slower than the LSTM's on CPU: time and torch operator count of one acting step
(backbone, heads, action sampling and log-prob, value), ElmurPPO's acting path against RecurrentPPO's LSTM policy, at
their default configs and 8 envs, in one process.

    python benchmarks/acting_ops.py --out benchmarks/results/acting_ops.md

Operators: the aten calls made from Python (an op that calls others counts once), from ``torch.profiler``. At a
few microseconds of dispatch each, on tensors of 8 x 64 values, their count rather than their arithmetic sets the
step time of a small model.
"""

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Callable, Dict

import torch
from sb3_contrib import RecurrentPPO
from torch.profiler import ProfilerActivity, profile

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common.utils import (
    code_commit,
    new_report_path,
    positive_int_argument,
    write_json_atomically,
    write_text_atomically,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import elmur_acting_step, median_ms_alternating, tmaze_env  # noqa: E402


def elmur_step(n_envs: int, compile: bool) -> Callable[[], None]:
    env = tmaze_env(n_envs)
    return elmur_acting_step(ElmurPPO("ElmurPolicy", env, seed=0).policy, env, compile)


def lstm_step(n_envs: int) -> Callable[[], None]:
    env = tmaze_env(n_envs)
    model = RecurrentPPO("MlpLstmPolicy", env, seed=0)
    model._setup_learn(1, None)
    obs, starts = torch.as_tensor(env.reset()), torch.zeros(n_envs)
    state = model._last_lstm_states

    def step() -> None:
        nonlocal state
        with torch.no_grad():
            _, _, _, state = model.policy.forward(obs, state, starts)  # actions, values and log-probs included

    return step


def measure(steps: Dict[str, Callable[[], None]], n_steps: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Median ms per step (rounds alternate between the cases) and aten operator calls per step of each case."""
    milliseconds = median_ms_alternating(steps, n_steps, rounds, warmup=100)  # warm-up: compilation too
    results = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
        top_level = [e for e in prof.events() if e.name.startswith("aten::")
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        results[name] = {"ms_per_step": milliseconds[name], "aten_ops_per_step": len(top_level) / 20}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/acting_ops.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-envs", type=positive_int_argument, default=8, help="Envs acted for at once.")
    parser.add_argument("--steps", type=positive_int_argument, default=300, help="Steps per timed round.")
    parser.add_argument("--rounds", type=positive_int_argument, default=5,
                        help="Timed rounds per case, alternating between the cases.")
    parser.add_argument("--out", default="benchmarks/results/acting_ops.md", help="Report (Markdown; JSON beside it).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)
    cases = {
        "ElmurPPO acting step (ElmurActor), ElmurPolicy defaults": lambda: elmur_step(args.n_envs, compile=False),
        "ElmurPPO acting step, compiled (compile_acting=True)": lambda: elmur_step(args.n_envs, compile=True),
        "RecurrentPPO + MlpLstmPolicy step (sb3-contrib defaults)": lambda: lstm_step(args.n_envs),
    }
    results = measure({name: make() for name, make in cases.items()}, args.steps, args.rounds)
    lstm = results["RecurrentPPO + MlpLstmPolicy step (sb3-contrib defaults)"]["ms_per_step"]
    lines = [
        "# Acting step: time and operator count, ELMUR against the LSTM",
        "",
        f"Command: `python benchmarks/acting_ops.py {' '.join(sys.argv[1:])}` (code {code_commit(Path(__file__).parent)}, "
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, torch {torch.__version__}, one "
        f"thread). {args.n_envs} envs; ms per step: median "
        f"of {args.rounds} alternating rounds of {args.steps} steps; aten ops: calls from Python per step (compiled: "
        "the kernels the graph runs are not aten calls, so its count is not comparable).",
        "",
        "| case | ms per step | x LSTM time | aten ops per step |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | {result['ms_per_step']:.3f} | {result['ms_per_step'] / lstm:.2f} | "
                     f"{result['aten_ops_per_step']:.0f} |")
    text = "\n".join(lines) + "\n"
    write_json_atomically(out.with_suffix(".json"), results)
    write_text_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()
