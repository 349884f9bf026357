"""Evaluate a saved policy on the T-Maze at a list of corridor lengths (up to 10^6 steps and beyond).

    python -m sb3_elmur.tmaze_eval model.zip --algo RecurrentBC --corridors 9 30 90 300 1000 9600 100000 1000000 \\
        --out results.json

Each length runs --episodes episodes (half with each cue) as one batch and prints its line; a table follows.
--out is checked before the model loads, and rewritten (atomically) after every corridor, so that the results
of the corridors already done survive a later failure ("complete": false until the last one is in). A run holds a
lock on --out (a hidden file beside it) until it ends: a second run on the same --out refuses at once. Ctrl-C stops
it with one line (exit status 130), the results of the corridors done kept.
"""

import argparse
import contextlib
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from sb3_elmur.common.utils import (
    LockedError,
    exclusive_lock,
    load_algorithm,
    positive_int_argument,
    write_json_atomically,
)
from sb3_elmur.tmaze_eval.evaluation import EvaluationWorkerError, TMazeResult, evaluate_tmaze_corridors


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the description's example kept as written."""


def check_out(path: Path, overwrite: bool) -> None:
    """Check that the results can be written to ``path`` before a (possibly hours-long) evaluation starts:
    create its folder and a temporary file there.

    :param path: the JSON file for the results
    :param overwrite: allow replacing an existing file (else it is an error: earlier results are never erased)
    :raise ValueError: naming the problem
    """
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: give a file name, such as {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {path} already exists: pass --overwrite to replace it, or choose another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ValueError(f"cannot write --out {path}: {error}") from error


def out_lock_path(out: Path) -> Path:
    """The lock file of a run writing ``out``: hidden, beside it."""
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _lock_out(parser: argparse.ArgumentParser, out: Optional[Path], overwrite: bool) -> Iterator[None]:
    """Hold the lock on ``out`` for the run (nothing if None), or exit with an error naming the run that holds it;
    under the lock, check ``out`` again: a run that finished since the first check has written it."""
    if out is None:
        yield
        return
    try:
        with exclusive_lock(out_lock_path(out)):
            try:
                check_out(out, overwrite)
            except ValueError as error:
                parser.error(str(error))
            yield  # the evaluation takes no lock of its own: a LockedError here is ours
    except LockedError as error:
        parser.error(f"--out {out} is being written by another tmaze_eval run ({error}): wait for it to end, or "
                     "choose another file")


def _record(result: TMazeResult, record: Dict[str, Any], out: Optional[Path], n_corridors: int) -> None:
    """Add one corridor's result to ``record``, print it, and rewrite ``out``: a later failure keeps it."""
    if result.compile_seconds:
        record["compile_seconds"] += result.compile_seconds
        print(f"compiled in {result.compile_seconds:.0f} s (not counted in the seconds below)", flush=True)
    rows = record["results"]
    rows.append({"corridor": result.corridor_length, "success": result.success, "seconds": result.seconds})
    record["complete"] = len(rows) == n_corridors
    if out is not None:
        write_json_atomically(out, record)
    print(f"corridor {result.corridor_length:>9,}: success {result.success:.2f}  ({result.seconds:.0f} s)", flush=True)


def _kept(out: Optional[Path], rows: List[Dict[str, float]]) -> str:
    """The line that says where the results of the corridors done before a failure are."""
    return f"the results of the {len(rows)} corridor(s) done are in {out}\n" if out is not None and rows else ""


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_elmur.tmaze_eval", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("model", help="path of the saved model (.zip)")
    parser.add_argument("--algo", default="RecurrentPPO", help="class whose load reads the model: RecurrentPPO, "
                        "RecurrentBC, PPO, ... (sb3_elmur, sb3-contrib or stable-baselines3)")
    parser.add_argument("--corridors", type=positive_int_argument, nargs="+", default=[9, 30, 90, 300, 1000, 9600, 100_000,
                        1_000_000], metavar="L", help="corridor lengths, evaluated in this order")
    parser.add_argument("--episodes", type=positive_int_argument, default=100, help="episodes per corridor length")
    parser.add_argument("--variant", default="reference", choices=["reference", "passive"],
                        help="T-Maze variant (success is the same in both: reaching the cued goal)")
    parser.add_argument("--stochastic", action="store_true", help="sample actions instead of acting greedily")
    parser.add_argument("--seed", type=int, default=0, help="seed of the observation noise (worker i: seed + i)")
    parser.add_argument("--out", default=None, help="JSON file for the results (not written if not given)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--workers", type=positive_int_argument, default=1,
                        help="processes to split the episodes over (one core each)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--compile", action="store_true", help="ElmurPolicy: act through torch.compile (about 2x "
                        "faster; every worker compiles once, timed apart, and needs a C++ compiler)")
    args = parser.parse_args(argv)
    out = None if args.out is None else Path(args.out)
    if out is not None:
        try:
            check_out(out, args.overwrite)
        except ValueError as error:
            parser.error(str(error))
    if not Path(args.model).is_file() and not Path(f"{args.model}.zip").is_file():
        parser.error(f"model file not found: {args.model}")
    torch.set_num_threads(1)
    record: Dict[str, Any] = {"results": []}
    try:
        with _lock_out(parser, out, args.overwrite):
            return _evaluate(parser, args, out, record)
    except KeyboardInterrupt:
        # One line, not a traceback: the corridors done are already written (and the lock released on the way out).
        rows = record["results"]
        done = _kept(out, rows).strip() or f"{len(rows)} corridor(s) done{', printed above' if rows else ''}"
        parser.exit(130, f"{parser.prog}: interrupted; {done}\n")


# What a damaged or foreign model file raises from SB3's load (zipfile, json, torch's reader, pickle): named in one line.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def _evaluate(
    parser: argparse.ArgumentParser, args: argparse.Namespace, out: Optional[Path], record: Dict[str, Any]
) -> List[Dict[str, float]]:
    """Load the model, evaluate it at every corridor length, write and print the results; :return: the rows.

    :param record: filled with the run's settings and results as they come (the caller reports them on Ctrl-C)
    """
    try:
        model = load_algorithm(args.algo, args.model, device="cpu")
    except _LOAD_ERRORS as error:
        parser.error(f"cannot load the model {args.model} with {args.algo}.load: {error}")
    record.update({
        "model": args.model, "algo": args.algo, "episodes": args.episodes, "variant": args.variant,
        "stochastic": args.stochastic, "seed": args.seed, "workers": args.workers, "compile": args.compile,
        "compile_seconds": 0.0, "complete": False, "results": [],
    })
    rows = record["results"]
    try:
        results = evaluate_tmaze_corridors(
            model,
            args.corridors,
            n_episodes=args.episodes,
            variant=args.variant,
            deterministic=not args.stochastic,
            seed=args.seed,
            progress_bar=not args.no_progress,
            n_workers=args.workers,
            compile=args.compile,
        )
    except ValueError as error:  # checked before any episode: a model of another env's spaces
        parser.error(f"{args.model}: {error}")
    try:
        for result in results:
            _record(result, record, out, len(args.corridors))
    except EvaluationWorkerError as error:  # it names the worker and what to do: no traceback
        parser.exit(1, f"{parser.prog}: error: {error}\n{_kept(out, rows)}")
    except Exception:  # a bug: its traceback, and where the results done are
        sys.stderr.write(_kept(out, rows))
        raise
    print("\n| corridor | success | seconds |\n|---|---|---|")
    for row in rows:
        print(f"| {row['corridor']:,} | {row['success']:.2f} | {row['seconds']:.0f} |")
    if args.compile:
        print(f"\ncompiling: {record['compile_seconds']:.0f} s, not in the seconds above")
    if out is not None:
        print(f"results written to {out}")
    return rows


if __name__ == "__main__":
    main()
