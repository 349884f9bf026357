"""RecurrentBC training speed: the same steps per gradient step as many short windows or as few long ones.

    python benchmarks/bc_speed.py --out benchmarks/results/bc_speed.md

A window of ``sections`` segments is trained segment after segment (the memory written by one segment is read by
the next), so a gradient step costs about as many sequential segment passes as its windows have segments: a batch
of many one-segment windows runs as one wide pass, a batch of a few long windows as many narrow ones. Each shape
holds 640 steps per gradient step (10-step segments) on noisy recall episodes of 30-400 steps; ElmurPolicy (the
recall benchmark's configuration) and the BC-LSTM are timed side by side, with and without burn-in (a window that
starts mid-episode first runs the episode up to it without gradient), shapes alternating within each round.
"""

import argparse
import platform
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import make_recall_dataset
from sb3_elmur.envs import NoisyRecallEnv
from sb3_elmur.common.utils import new_report_path, write_json_atomically, write_text_atomically

ELMUR = dict(d_model=64, n_layers=2, n_heads=2, memory_size=2, context_length=10)
POLICIES = {"ElmurPolicy": ELMUR, "MlpLstmPolicy": dict(lstm_hidden_size=128)}
# (windows per gradient step, segments per window): 640 steps each
SHAPES: List[Tuple[int, int]] = [(64, 1), (16, 4), (8, 8), (2, 32)]


def steps_per_second(model: RecurrentBC, gradient_steps: int) -> float:
    model.learn(2)  # warm-up (allocations, first burn-in)
    start = time.perf_counter()
    model.learn(gradient_steps)
    return gradient_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bc_speed.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every shape is timed once per round.")
    parser.add_argument("--gradient-steps", type=int, default=10, help="Timed gradient steps per measurement.")
    parser.add_argument("--out", default="benchmarks/results/bc_speed.md", help="Markdown report to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    dataset = make_recall_dataset(500, length=(30, 400), seed=0)
    models: Dict[Tuple[str, bool, int, int], RecurrentBC] = {
        (policy, burn_in, batch, sections): RecurrentBC(policy, NoisyRecallEnv(), dataset, batch_size=batch,
                                                        sections=sections, context_length=10, burn_in=burn_in,
                                                        policy_kwargs=kwargs, seed=0)
        for policy, kwargs in POLICIES.items() for burn_in in (True, False) for batch, sections in SHAPES
    }
    rates: Dict[Tuple[str, bool, int, int], List[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            rates[key].append(steps_per_second(model, args.gradient_steps))

    rows = []
    for (policy, burn_in, batch, sections), values in rates.items():
        median = float(np.median(values))
        fastest = float(np.median(rates[(policy, burn_in, *SHAPES[0])]))
        rows.append({"policy": policy, "burn_in": burn_in, "windows": batch, "segments": sections,
                     "gradient_steps_per_s": median,
                     "env_steps_per_s": median * batch * sections * 10, "relative_to_one_segment": median / fastest,
                     "all": values})
    lines = [
        "# RecurrentBC training speed: many short windows vs few long ones",
        "",
        f"Command: `python benchmarks/bc_speed.py --rounds {args.rounds} --gradient-steps {args.gradient_steps} --out "
        f"{args.out}`; {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread. Median "
        f"over {args.rounds} rounds of {args.gradient_steps} gradient steps; every shape holds 640 steps (10-step "
        "segments) per gradient step.",
        "",
        "| policy | burn-in | windows x segments | gradient steps/s | env steps/s | vs 64 x 1 |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['policy']} | {'on' if row['burn_in'] else 'off'} | {row['windows']} x {row['segments']} | "
                     f"{row['gradient_steps_per_s']:.2f} | "
                     f"{row['env_steps_per_s']:,.0f} | {row['relative_to_one_segment']:.2f}x |")
    write_json_atomically(out.with_suffix(".json"), {"rows": rows, "rounds": args.rounds})
    write_text_atomically(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
