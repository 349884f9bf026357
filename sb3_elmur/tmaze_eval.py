"""Evaluate a saved policy on the T-Maze at a list of corridor lengths (up to 10^6 steps and beyond).

    python -m sb3_elmur.tmaze_eval model.zip --algo RecurrentBC --corridors 9 30 90 300 1000 9600 100000 1000000 \\
        --out results.json

Each length runs ``--episodes`` episodes (half with each cue) as one batch; prints a table and writes JSON.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from sb3_elmur.evaluation import evaluate_tmaze
from sb3_elmur.utils import load_algorithm


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="path of the saved model (.zip)")
    parser.add_argument("--algo", default="RecurrentPPO", help="RecurrentPPO, RecurrentBC, PPO, ...")
    parser.add_argument("--corridors", type=int, nargs="+", default=[9, 30, 90, 300, 1000, 9600, 100_000, 1_000_000])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--variant", default="reference", choices=["reference", "passive"])
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of acting greedily")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--workers", type=int, default=1, help="processes to split the episodes over (one core each)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--compile", action="store_true", help="ElmurPolicy: act through torch.compile (about 2x faster)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = load_algorithm(args.algo, args.model, device="cpu")
    rows = []
    for corridor in args.corridors:
        start = time.perf_counter()
        success = evaluate_tmaze(
            model,
            corridor,
            n_episodes=args.episodes,
            variant=args.variant,
            deterministic=not args.stochastic,
            seed=args.seed,
            progress_bar=not args.no_progress,
            n_workers=args.workers,
            compile=args.compile,
        )
        rows.append({"corridor": corridor, "success": success, "seconds": time.perf_counter() - start})
        print(f"corridor {corridor:>9,}: success {success:.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    print("\n| corridor | success | seconds |\n|---|---|---|")
    for row in rows:
        print(f"| {row['corridor']:,} | {row['success']:.2f} | {row['seconds']:.0f} |")
    if args.out:
        result = {"model": args.model, "algo": args.algo, "episodes": args.episodes, "variant": args.variant,
                  "workers": args.workers, "compile": args.compile, "results": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return rows


if __name__ == "__main__":
    main()
