"""The paper's T-Maze claim, offline: behaviour cloning on oracle episodes of at most 29 steps (corridors 1..28),
evaluated at corridors up to 1,000,000 steps. ElmurPolicy (context 10, 3 segments, 2 slots per layer) and the
BC-LSTM baseline (sb3-contrib's MlpLstmPolicy) are trained by the same RecurrentBC code on the same data.

    python benchmarks/tmaze_offline.py --seeds 0 1 2 --corridors 9 30 90 300 1000 9600 100000 1000000

Every (policy, seed) trains once (model saved) and every corridor is evaluated once (result cached), so the
run can be split across sessions; the table is rebuilt from everything evaluated so far.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict

import gymnasium as gym
import torch

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import make_tmaze_dataset
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze
from sb3_elmur.common.utils import success_table_rows, train_and_evaluate_once, write_text_atomically

POLICIES: Dict[str, Dict[str, Any]] = {
    "ElmurPolicy": dict(d_model=32, n_layers=1, n_heads=2, memory_size=2, context_length=10),
    "MlpLstmPolicy": dict(lstm_hidden_size=64),
}


def train(policy: str, seed: int, gradient_steps: int, path: Path) -> Dict[str, Any]:
    dataset = make_tmaze_dataset(2000, min_corridor=1, max_corridor=28, seed=0)
    model = RecurrentBC(
        policy,
        gym.make("sb3_elmur/TMaze-v0"),
        dataset,
        learning_rate=1e-3,
        batch_size=64,
        sections=3,
        context_length=10,
        policy_kwargs=POLICIES[policy],
        seed=seed,
    )
    start = time.process_time()
    model.learn(gradient_steps)
    cpu_seconds = time.process_time() - start
    model.save(path)
    return {"train_cpu_seconds": cpu_seconds, "gradient_steps": gradient_steps,
            "parameters": sum(p.numel() for p in model.policy.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/tmaze_offline.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="Policies to train and evaluate."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds, one model each.")
    parser.add_argument("--corridors", type=int, nargs="+", default=[9, 30, 90, 300, 1000, 9600, 100_000, 1_000_000],
                        help="Corridor lengths to evaluate at (100 episodes each).")
    parser.add_argument("--gradient-steps", type=int, default=1000, help="Gradient steps of behaviour cloning.")
    parser.add_argument("--workers", type=int, default=1, help="Evaluation processes (one core each).")
    parser.add_argument("--compile", action="store_true", help="ElmurPolicy: act through torch.compile (about 2x faster).")
    parser.add_argument(
        "--reevaluate", type=int, nargs="*", default=[], help="Corridors to evaluate again, replacing their cached results."
    )
    parser.add_argument("--out", default="benchmarks/results/tmaze_offline", help="Folder of models, results and the table.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(model: RecurrentBC, corridor: int) -> Dict[str, Any]:
        start = time.perf_counter()
        success = evaluate_tmaze(model, corridor, n_episodes=100, variant="reference", n_workers=args.workers,
                                 progress_bar=corridor >= 100_000, compile=args.compile)
        return {"success": success, "seconds": time.perf_counter() - start, "workers": args.workers,
                "compile": args.compile}

    for policy in args.policies:
        for seed in args.seeds:
            train_and_evaluate_once(
                f"{policy}_s{seed}", out, lambda path: train(policy, seed, args.gradient_steps, path),
                lambda path: RecurrentBC.load(path, device="cpu"), evaluate, args.corridors, args.reevaluate,
            )

    corridors, rows = success_table_rows(out)
    lines = [
        "# T-Maze offline: trained on corridors 1..28 (2000 oracle episodes), evaluated up to 10^6 steps",
        "",
        "Command: `python benchmarks/tmaze_offline.py " + " ".join(sys.argv[1:]) + "` (runs accumulate across commands)",
        "",
        "Success over 100 greedy episodes (50 per cue); train = CPU seconds of RecurrentBC.learn; "
        "eval seconds (wall) of the longest corridor in the last column, with the number of evaluation processes.",
        "",
        "| policy | seed | params | train CPU s | " + " | ".join(f"{c:,}" for c in corridors) + " | eval s (longest) |",
        "|---|---|---|---|" + "---|" * len(corridors) + "---|",
    ]
    for policy, seed, record, cells in rows:
        evaluations = record["evaluations"]
        longest = evaluations[str(max(int(c) for c in evaluations))] if evaluations else {"seconds": 0.0}
        processes = f"{longest.get('workers', 1)} proc.{', compiled' if longest.get('compile') else ''}"
        lines.append(f"| {policy} | {seed} | {record.get('parameters', 0):,} | {record.get('train_cpu_seconds', 0):.0f} | "
                     + " | ".join(cells) + f" | {longest['seconds']:.0f} ({processes}) |")
    text = "\n".join(lines) + "\n"
    write_text_atomically(out.parent / "tmaze_offline.md", text)
    print(text)


if __name__ == "__main__":
    main()
