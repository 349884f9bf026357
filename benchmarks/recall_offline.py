"""Offline length generalization on the noisy recall task: behaviour cloning on oracle episodes of 30 to 100 steps
(a cue at the first step, Gaussian noise every step, the answer at the end), evaluated up to 10^5 steps. ElmurPolicy,
with and without RecurrentBC's burn-in, against the BC-LSTM baseline, trained by the same code on the same data, and
both under the paper's protocol (episodes of 2-30 steps, 3 segments).

    python benchmarks/recall_offline.py --seeds 0 1 2 --lengths 30 100 1000 10000 100000
    python benchmarks/recall_offline.py --wait --out runs/recall_offline_wait --report benchmarks/results/recall_offline_wait

``--wait`` is the task's other form: the expert waits until the query and names the cue only there (T-Maze's
structure with a noisy corridor), so the memory is supervised once per episode.

Every (configuration, seed) trains once (model and record in ``--out``, under ``runs/``: git-ignored) and every
length is evaluated once (result cached), so the run can be split across sessions. The report is rebuilt from every
record in ``--out``: ``--report``.md (the table, with the command, commit, machine and date), ``--report``.json
(each run's record) and ``--report``.png (success against length), which an existing report only replaces with
``--overwrite``. ``--report-only`` rewrites the report from ``--out``'s records, or, in a fresh clone with none,
from ``--report``.json.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

import sb3_elmur  # noqa: F401
from sb3_elmur.bc import RecurrentBC
from sb3_elmur.bc.collect import make_recall_dataset
from sb3_elmur.envs import NoisyRecallEnv, NoisyRecallVecEnv
from sb3_elmur.common.evaluation import evaluate_success
from sb3_elmur.common.utils import (
    new_report_path,
    plot_success_by_length,
    refuse_record_problems,
    success_table_rows,
    train_and_evaluate_once,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import (  # noqa: E402
    add_report_options, learn_and_save, origin_lines, records_folder, report_origin, rewrite_report, save_report,
)

ELMUR = dict(d_model=64, n_layers=2, n_heads=2, memory_size=2, context_length=10)
# Windows of 10 segments of 10 steps: a whole episode of up to 100 steps, more segments than slots
LONG = dict(length=(30, 100), sections=10)
# The paper's T-Maze protocol (corridors of 1-28): episodes of 2-30 steps, windows of 3 segments
SHORT = dict(length=(2, 30), sections=3)
# Both: episodes of 2-100 steps, so that short ones teach the cue and long ones teach it to survive evictions
MIXED = dict(length=(2, 100), sections=10)
# name: (policy, policy kwargs, RecurrentBC kwargs, training episodes)
CONFIGS: Dict[str, Any] = {
    "ElmurPolicy": ("ElmurPolicy", ELMUR, dict(burn_in=True), LONG),
    "ElmurPolicy-no-burn-in": ("ElmurPolicy", ELMUR, dict(burn_in=False), LONG),
    "MlpLstmPolicy": ("MlpLstmPolicy", dict(lstm_hidden_size=128), dict(burn_in=True), LONG),
    # The paper's protocol: episodes of at most 30 steps, 3 segments of 10 (at most 2 writes into 2 slots)
    "ElmurPolicy-paper-protocol": ("ElmurPolicy", ELMUR, dict(burn_in=True), SHORT),
    "MlpLstmPolicy-paper-protocol": ("MlpLstmPolicy", dict(lstm_hidden_size=128), dict(burn_in=True), SHORT),
    "ElmurPolicy-2-100": ("ElmurPolicy", ELMUR, dict(burn_in=True), MIXED),
    "ElmurPolicy-2-50": ("ElmurPolicy", ELMUR, dict(burn_in=True), dict(length=(2, 50), sections=5)),
    # The paper's protocol with one slot: the second write evicts the first, so training needs the cue to survive it
    "ElmurPolicy-paper-protocol-1-slot": ("ElmurPolicy", {**ELMUR, "memory_size": 1}, dict(burn_in=True), SHORT),
    "MlpLstmPolicy-2-100": ("MlpLstmPolicy", dict(lstm_hidden_size=128), dict(burn_in=True), MIXED),
    # An auxiliary loss that predicts the episode's last action (the answer) at every step: with a waiting expert,
    # it supervises what memory must keep at every step, as the every-step expert does
    "ElmurPolicy-final-action": ("ElmurPolicy", ELMUR, dict(burn_in=True, final_action_coef=1.0), LONG),
    "MlpLstmPolicy-final-action": ("MlpLstmPolicy", dict(lstm_hidden_size=128), dict(burn_in=True, final_action_coef=1.0),
                                   LONG),
    "ElmurPolicy-paper-protocol-final-action": ("ElmurPolicy", ELMUR, dict(burn_in=True, final_action_coef=1.0), SHORT),
}


def train(name: str, seed: int, gradient_steps: int, wait: bool, path: Path) -> Dict[str, Any]:
    policy, policy_kwargs, bc_kwargs, episodes = CONFIGS[name]
    dataset = make_recall_dataset(2000, length=episodes["length"], wait=wait, seed=0)
    model = RecurrentBC(policy, NoisyRecallEnv(wait=wait), dataset, learning_rate=1e-3, batch_size=64,
                        sections=episodes["sections"], context_length=10, policy_kwargs=policy_kwargs, seed=seed,
                        **bc_kwargs)
    return learn_and_save(model, gradient_steps, path)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/recall_offline.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--wait", action="store_true", help="The task's waiting form (see above).")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="Configurations to train and evaluate.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds, one model each.")
    parser.add_argument("--lengths", type=int, nargs="+", default=[30, 100, 1000, 10_000, 100_000],
                        help="Episode lengths to evaluate at (100 episodes each).")
    parser.add_argument("--gradient-steps", type=int, default=1000, help="Gradient steps of behaviour cloning.")
    add_report_options(parser, "runs/recall_offline", "benchmarks/results/recall_offline", report_help=(
        "Report path without suffix: REPORT.md (table), REPORT.json (every run's record), REPORT.png."))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    if args.report_only:
        rewrite_report(parser, args, write_report)
        return
    out, report = Path(args.out), Path(args.report)
    settings = {"gradient_steps": args.gradient_steps, "wait": args.wait}
    refuse_record_problems(parser, [(out, f"{name}_s{seed}") for name in args.configs for seed in args.seeds], settings)
    new_report_path(parser, f"{report}.md", args.overwrite)
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(model: RecurrentBC, length: int, seed: int) -> Dict[str, Any]:
        start = time.perf_counter()
        env = NoisyRecallVecEnv(100, length=length, wait=args.wait, seed=1000 + seed)
        # torch.compile pays its tens of seconds back on long episodes only (ElmurPolicy; ignored for the LSTM)
        success = evaluate_success(model, env, length, progress_bar=length >= 10_000, compile=length >= 10_000)
        return {"success": success, "seconds": time.perf_counter() - start}

    for name in args.configs:
        for seed in args.seeds:
            train_and_evaluate_once(
                f"{name}_s{seed}", out, lambda path: train(name, seed, args.gradient_steps, args.wait, path),
                lambda path: RecurrentBC.load(path, device="cpu"), lambda model, length: evaluate(model, length, seed),
                args.lengths, settings=settings,
            )

    write_report(out, report, None, report_origin(parser))


def write_report(out: Path, report: Path, saved: Optional[Dict[str, Any]], origin: Dict[str, str]) -> None:
    """``report``.md, .json and .png from the records in ``out`` (or ``saved``'s); ``origin``: the command,
    commit, machine and date the report names. The form (every-step or waiting) is the records'."""
    with records_folder(out, saved) as folder:
        lengths, rows = success_table_rows(folder)
        wait = any(record.get("wait") for _, _, record, _ in rows)
        plot_success_by_length(folder, Path(f"{report}.png"),
                               f"Noisy recall{' (waiting expert)' if wait else ''}: success far past the training length")
    lines = [
        f"# Noisy recall{' (waiting expert)' if wait else ''} offline: trained on 30-100-step episodes (2000 "
        "oracle episodes; the paper's protocol: 2-30), evaluated up to 10^5 steps",
        "",
        *origin_lines(origin, report),
        "3 cues (chance 0.33), 4 Gaussian noise entries per observation; windows of 10 segments of 10 steps (the "
        "paper's protocol: 3); success over 100 greedy episodes per length; train = CPU seconds of RecurrentBC.learn.",
        "",
        "| configuration | seed | params | train CPU s | " + " | ".join(f"{c:,}" for c in lengths) + " |",
        "|---|---|---|---|" + "---|" * len(lengths),
    ]
    for config, seed, record, cells in rows:
        lines.append(f"| {config} | {seed} | {record.get('parameters', 0):,} | {record.get('train_cpu_seconds', 0):.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{report.name}.png` (success against the evaluation length, mean and seeds)."]
    save_report(report, origin, {f"{c}_s{s}": r for c, s, r, _ in rows}, "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
