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
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import gymnasium as gym
import torch

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import make_tmaze_dataset
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze
from sb3_elmur.common.utils import (
    code_commit,
    new_report_path,
    success_table_rows,
    train_and_evaluate_once,
    write_json_atomically,
    write_text_atomically,
)

POLICIES: Dict[str, Dict[str, Any]] = {
    "ElmurPolicy": dict(d_model=32, n_layers=1, n_heads=2, memory_size=2, context_length=10),
    "MlpLstmPolicy": dict(lstm_hidden_size=64),
}

# What a report names besides its runs (the last command's)
ORIGIN = ("command", "commit", "machine", "date")


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
            "parameters": sum(p.numel() for p in model.policy.parameters()), **provenance()}


def provenance() -> Dict[str, str]:
    """The code's commit, the machine and the date, for records and reports."""
    return {"commit": code_commit(Path(__file__).parent), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                       f"torch {torch.__version__}, one thread per process"}


@contextlib.contextmanager
def records_folder(out: Path, saved: Optional[Dict[str, Any]]) -> Iterator[Path]:
    """``out`` if it holds records, else a temporary folder with the records of the saved report (a fresh clone)."""
    if any(out.glob("*_s*.json")) or saved is None:
        yield out
        return
    with tempfile.TemporaryDirectory() as folder:
        for name, record in saved["runs"].items():
            (Path(folder) / f"{name}.json").write_text(json.dumps(record))
        yield Path(folder)


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
    parser.add_argument("--out", default="runs/tmaze_offline", help="Folder of models and per-run records (resumable).")
    parser.add_argument("--report", default="benchmarks/results/tmaze_offline",
                        help="Report path without suffix: REPORT.md (table) and REPORT.json (every run's record).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    parser.add_argument("--report-only", action="store_true",
                        help="Rewrite the report from the records in --out (none: from REPORT.json), without training.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    out, report = Path(args.out), Path(args.report)
    saved = json.loads(Path(f"{report}.json").read_text()) if Path(f"{report}.json").exists() else None
    new_report_path(parser, f"{report}.md", args.overwrite)
    if args.report_only:
        if saved is None and not any(out.glob("*_s*.json")):
            parser.error(f"--report-only: no records in {out} and no {report}.json")
        origin = {key: saved[key] for key in ORIGIN} if saved else {"command": command(), **provenance()}
        write_report(out, report, saved, origin)
        return
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

    write_report(out, report, None, {"command": command(), **provenance()})


def command() -> str:
    return "python benchmarks/tmaze_offline.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def write_report(out: Path, report: Path, saved: Optional[Dict[str, Any]], origin: Dict[str, str]) -> None:
    """``report``.md and .json from the records in ``out`` (or ``saved``'s); ``origin``: the command, commit,
    machine and date the report names."""
    with records_folder(out, saved) as folder:
        corridors, rows = success_table_rows(folder)
    lines = [
        "# T-Maze offline: trained on corridors 1..28 (2000 oracle episodes), evaluated up to 10^6 steps",
        "",
        f"Command: `{origin['command']}` (runs accumulate across commands)",
        "",
        f"Commit: {origin['commit']}; machine: {origin['machine']}; date: {origin['date']} (the last command's; "
        f"each run's record: `{report.name}.json`).",
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
    runs = {f"{policy}_s{seed}": record for policy, seed, record, _ in rows}
    write_json_atomically(Path(f"{report}.json"), {**origin, "runs": runs})
    write_text_atomically(Path(f"{report}.md"), text)
    print(text)

if __name__ == "__main__":
    main()
