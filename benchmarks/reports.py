"""What the reports of the long benchmarks (recall_offline, tmaze_offline, popgym_offline, tmaze_vs_lstm) share:
their options, where a report and a run record come from (command, commit, machine, date), the records a report is
rebuilt from in a fresh clone, and its .json and .md files; and the timing of the speed benchmarks (acting_ops,
option_cost, export_speed), with their env and ElmurPPO's acting step. Not a script: the scripts import it from their
folder."""

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from sb3_elmur.common.actor import ElmurActor
from sb3_elmur.common.utils import code_commit, new_report_path, write_json_atomically, write_text_atomically

# What a report names besides its runs (the last command's)
ORIGIN = ("command", "commit", "machine", "date")
# The run records of train_and_evaluate_once (``<name>_s<seed>.json``), whose presence in --out tells that the report
# is to be rebuilt from them rather than from its .json
RECORDS = "*_s*.json"


def add_report_options(
    parser: argparse.ArgumentParser,
    out: str,
    report: str,
    out_help: str = "Folder of models and per-run records (resumable).",
    report_help: str = "Report path without suffix: REPORT.md (table) and REPORT.json (every run's record).",
) -> None:
    """Add the options ``--out``, ``--report``, ``--overwrite`` and ``--report-only`` of a report rebuilt from the
    run records in a folder.

    :param out: the default of ``--out``, the folder of the run records
    :param report: the default of ``--report``, the report's path without suffix
    :param out_help: the help of ``--out``
    :param report_help: the help of ``--report`` (the files it names)
    """
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--report", default=report, help=report_help)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    parser.add_argument("--report-only", action="store_true",
                        help="Rewrite the report from the records in --out (none: from REPORT.json), without training.")


def provenance() -> Dict[str, str]:
    """The code's commit, the machine and the date, for records and reports."""
    return {"commit": code_commit(Path(__file__).parent), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                       f"torch {torch.__version__}, one thread per process"}


def learn_and_save(model: Any, gradient_steps: int, path: Path) -> Dict[str, Any]:
    """Train a RecurrentBC ``model`` for ``gradient_steps`` and save it to ``path``.

    :return: the figures of its run record (``train`` of ``train_and_evaluate_once``): the CPU seconds of
        ``learn``, the gradient steps, the parameter count and :func:`provenance`
    """
    start = time.process_time()
    model.learn(gradient_steps)
    cpu_seconds = time.process_time() - start
    model.save(path)
    return {"train_cpu_seconds": cpu_seconds, "gradient_steps": gradient_steps,
            "parameters": sum(p.numel() for p in model.policy.parameters()), **provenance()}


def command(parser: argparse.ArgumentParser) -> str:
    """The command line that ran the script, as its report names it (``parser.prog``: ``python benchmarks/...``)."""
    return f"{parser.prog} " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def saved_report(report: Path) -> Optional[Dict[str, Any]]:
    """The report's committed ``report``.json (its origin and every run's record), or None if there is none."""
    path = Path(f"{report}.json")
    return json.loads(path.read_text()) if path.exists() else None


def report_origin(parser: argparse.ArgumentParser, saved: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """What a report names besides its runs (:data:`ORIGIN`): ``saved``'s when it is rebuilt from a saved report,
    else this command's, with this commit, machine and date."""
    return {key: saved[key] for key in ORIGIN} if saved else {"command": command(parser), **provenance()}


def rewrite_report(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    write_report: Callable[[Path, Path, Optional[Dict[str, Any]], Dict[str, str]], None],
    records: str = RECORDS,
) -> None:
    """``--report-only``: rewrite the report ``args.report`` from the records in ``args.out``, or, in a fresh clone
    with none, from ``args.report``.json, which then also gives the report's origin. Refused (``parser.error``: exit
    2) if the report exists and not ``args.overwrite``, or if there are neither records nor ``args.report``.json.

    :param args: the parsed options of :func:`add_report_options`
    :param write_report: the script's (out, report, saved report or None, origin) -> writes the report
    :param records: the glob of the records in ``args.out``
    """
    out, report = Path(args.out), Path(args.report)
    new_report_path(parser, f"{report}.md", args.overwrite)
    saved = saved_report(report)
    if saved is None and not any(out.glob(records)):
        parser.error(f"--report-only: no records in {out} and no {report}.json")
    write_report(out, report, saved, report_origin(parser, saved))


@contextlib.contextmanager
def records_folder(out: Path, saved: Optional[Dict[str, Any]], records: str = RECORDS) -> Iterator[Path]:
    """``out`` if it holds records (``records``: their glob), else a temporary folder with the records of the saved
    report (a fresh clone), each ``<name>.json`` of its ``runs`` (a name may have a folder: ``<task>/<run>``)."""
    if any(out.glob(records)) or saved is None:
        yield out
        return
    with tempfile.TemporaryDirectory() as folder:
        for name, record in saved["runs"].items():
            (Path(folder) / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{name}.json").write_text(json.dumps(record))
        yield Path(folder)


def origin_lines(origin: Dict[str, str], report: Union[str, Path], accumulate: bool = True) -> List[str]:
    """The lines of a report's .md that name where it comes from, each followed by an empty line: the command
    (``accumulate``: with the note that runs accumulate across commands), then its commit, machine and date, and
    the name of the report's .json (``report``: the report's path or name without suffix)."""
    return [
        f"Command: `{origin['command']}`{' (runs accumulate across commands)' if accumulate else ''}",
        "",
        f"Commit: {origin['commit']}; machine: {origin['machine']}; date: {origin['date']} (the last command's; "
        f"each run's record: `{Path(report).name}.json`).",
        "",
    ]


def save_report(report: Path, origin: Dict[str, str], runs: Any, text: str) -> None:
    """Write ``report``.json (``origin`` and ``runs``, every run's record) and ``report``.md (``text``), each
    atomically, and print ``text``."""
    write_json_atomically(Path(f"{report}.json"), {**origin, "runs": runs})
    write_text_atomically(Path(f"{report}.md"), text)
    print(text)


def median_ms_alternating(
    functions: Dict[str, Callable[[], Any]], calls: int, rounds: int, warmup: int = 50
) -> Dict[str, float]:
    """Median milliseconds per call of each function, over ``rounds`` timed rounds of ``calls`` calls that alternate
    between the functions, so that load from other jobs weighs on all of them alike (ratios in one run stay fair).

    :param functions: what to time, by name
    :param warmup: untimed calls of each first (allocations, caches, compilation)
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def tmaze_env(n_envs: int) -> VecEnv:
    """The speed benchmarks' env: passive T-Maze, corridor 100, seed 0."""
    return make_vec_env("sb3_elmur/PassiveTMaze-v0", n_envs=n_envs, seed=0, env_kwargs={"corridor_length": 100})


def elmur_acting_step(policy: Any, env: VecEnv, compile: bool = False) -> Callable[[], None]:
    """One ElmurPPO rollout step of ``policy`` (an ElmurPolicy) on ``env``'s first observations: ``ElmurActor``,
    heads, action sampling and log-prob, value, without gradients, as ElmurPPO's rollouts."""
    actor = ElmurActor(policy, env.num_envs, compile=compile)
    obs, starts = torch.as_tensor(env.reset()), torch.zeros(env.num_envs, dtype=torch.bool)
    return lambda: actor.sample(obs, starts)
