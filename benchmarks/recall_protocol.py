"""How long must training episodes be? Small ELMURs trained by RecurrentBC on noisy recall episodes of a length
range, with windows of a given number of segments and memory slots, evaluated at 2,000 steps.

    python benchmarks/recall_protocol.py --configs 10-30/3/2 10-40/4/2 10-40/4/3 10-40/4/4 10-30/3/1 --seeds 0 1 2

Each config is LOW-HIGH/SECTIONS/SLOTS: training episodes of LOW..HIGH steps, windows of SECTIONS segments of 10
steps, SLOTS memory slots per layer (1 layer, d_model 32, 500 oracle episodes, 300 gradient steps at lr 3e-3).
``--wait`` runs the task's waiting form (the expert names the cue only at the query: one supervised memory use
per episode). Writes a markdown table and its JSON (refusing to replace them without --overwrite).
"""

import argparse
import time
from typing import Dict, List

import numpy as np
import torch

from sb3_elmur import RecurrentBC
from sb3_elmur.bc.collect import make_recall_dataset
from sb3_elmur.envs import NoisyRecallEnv, NoisyRecallVecEnv
from sb3_elmur.common.evaluation import evaluate_success
from sb3_elmur.common.utils import new_report_path, write_json_atomically, write_text_atomically


def run(config: str, seed: int, gradient_steps: int, lengths: List[int], wait: bool) -> Dict[str, float]:
    span, sections, slots = config.split("/")
    low, high = (int(v) for v in span.split("-"))
    dataset = make_recall_dataset(500, length=(low, high), wait=wait, seed=0)
    model = RecurrentBC("ElmurPolicy", NoisyRecallEnv(wait=wait), dataset, sections=int(sections), context_length=10,
                        batch_size=32, learning_rate=3e-3, seed=seed,
                        policy_kwargs=dict(d_model=32, n_layers=1, memory_size=int(slots), context_length=10))
    model.learn(gradient_steps)
    return {str(n): evaluate_success(model, NoisyRecallVecEnv(60, length=n, wait=wait, seed=1), n) for n in lengths}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/recall_protocol.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["10-30/3/2", "10-40/4/2", "10-40/4/3", "10-40/4/4", "10-30/3/1"],
                        help="LOW-HIGH/SECTIONS/SLOTS settings.")
    parser.add_argument("--wait", action="store_true", help="The task's waiting form (see above).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    parser.add_argument("--gradient-steps", type=int, default=300, help="Gradient steps of behaviour cloning.")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 2000], help="Evaluation lengths (60 episodes).")
    parser.add_argument("--out", default="benchmarks/results/recall_protocol.md", help="Markdown report.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    results: Dict[str, List[Dict[str, float]]] = {}
    for config in args.configs:
        for seed in args.seeds:
            start = time.perf_counter()
            results.setdefault(config, []).append(run(config, seed, args.gradient_steps, args.lengths, args.wait))
            print(f"{config} seed {seed}: {results[config][-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    lines = [
        "# Noisy recall" + (" (waiting expert)" if args.wait else "") + ": training length, window and slots "
        "against success far past the training length",
        "",
        f"`python benchmarks/recall_protocol.py{' --wait' if args.wait else ''} --configs {' '.join(args.configs)} --seeds "
        f"{' '.join(map(str, args.seeds))} --gradient-steps {args.gradient_steps} "
        f"--lengths {' '.join(map(str, args.lengths))}`: config LOW-HIGH/SECTIONS/SLOTS, "
        "success over 60 greedy episodes per seed (3 cues: chance 0.33).",
        "",
        "| config | " + " | ".join(f"success at {n:,} (per seed; mean)" for n in args.lengths) + " |",
        "|---|" + "---|" * len(args.lengths),
    ]
    for config, runs in results.items():
        cells = [", ".join(f"{r[str(n)]:.2f}" for r in runs) + f"; {np.mean([r[str(n)] for r in runs]):.2f}"
                 for n in args.lengths]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    write_json_atomically(out.with_suffix(".json"), dict(args=vars(args), results=results))
    write_text_atomically(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
