"""The paper's T-Maze claim, offline: behaviour cloning on oracle episodes of at most 29 steps (corridors 1..28),
evaluated at corridors up to 1,000,000 steps. ElmurPolicy (context 10, 3 segments, 2 slots per layer) and the
BC-LSTM baseline (sb3-contrib's MlpLstmPolicy) are trained by the same RecurrentBC code on the same data.

    python benchmarks/tmaze_offline.py --seeds 0 1 2 --corridors 9 30 90 300 1000 9600 100000 1000000

Every (policy, seed) trains once (model and record in ``--out``, ``runs/tmaze_offline``: git-ignored) and every
corridor is evaluated once (result cached), so the run can be split across sessions. The report is rebuilt from
every record in ``--out``: ``--report``.md (the table, with the command, commit, machine and date) and
``--report``.json (each run's record), ``benchmarks/results/tmaze_offline.*`` by default, which an existing report
only replaces with ``--overwrite``. ``--report-only`` rewrites the report from ``--out``'s records, or, in a fresh
clone with none, from ``--report``.json.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import gymnasium as gym
import torch

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import make_tmaze_dataset
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze
from sb3_elmur.common.utils import new_report_path, success_table_rows, train_and_evaluate_once

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import (  # noqa: E402
    add_report_options, learn_and_save, origin_lines, records_folder, report_origin, rewrite_report, save_report,
)

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
    return learn_and_save(model, gradient_steps, path)


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
    add_report_options(parser, "runs/tmaze_offline", "benchmarks/results/tmaze_offline")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    if args.report_only:
        rewrite_report(parser, args, write_report)
        return
    out, report = Path(args.out), Path(args.report)
    new_report_path(parser, f"{report}.md", args.overwrite)
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

    write_report(out, report, None, report_origin(parser))


def write_report(out: Path, report: Path, saved: Optional[Dict[str, Any]], origin: Dict[str, str]) -> None:
    """``report``.md and .json from the records in ``out`` (or ``saved``'s); ``origin``: the command, commit,
    machine and date the report names."""
    with records_folder(out, saved) as folder:
        corridors, rows = success_table_rows(folder)
    lines = [
        "# T-Maze offline: trained on corridors 1..28 (2000 oracle episodes), evaluated up to 10^6 steps",
        "",
        *origin_lines(origin, report),
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
    runs = {f"{policy}_s{seed}": record for policy, seed, record, _ in rows}
    save_report(report, origin, runs, "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
