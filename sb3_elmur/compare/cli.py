"""Compare policies (ElmurPolicy, MlpLstmPolicy, plain MlpPolicy, ...) on the same env ids, budget and seeds.

    python -m sb3_elmur.compare --envs popgym-RepeatPreviousEasy-v0 sb3_elmur/PassiveTMaze-v0 \\
        --policies ElmurPolicy MlpLstmPolicy MlpPolicy --seeds 0 1 2 --timesteps 200000 --jobs 2 --out runs/compare

Every (env, policy, seed) run is a subprocess that writes one JSON file (settings, evaluation history, wall
time) and checkpoints its model at every evaluation point. A later invocation with the same settings skips the
finished runs and resumes the unfinished ones from their checkpoint, so a long comparison can be split across
sessions (``--time-budget`` stops cleanly). The markdown table, a JSON summary and a PNG of learning curves are
rebuilt from all run files at the end (``--report-only`` rebuilds them without training). Training logs go to
TensorBoard (``<out>/tensorboard``), with ELMUR's memory scalars for ELMUR policies.
"""

import argparse
import json
import shlex
import sys
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence

from sb3_elmur.common.checks import check_device, check_int
from sb3_elmur.compare import worker
from sb3_elmur.compare.envs import check_runs
from sb3_elmur.compare.launcher import launch_runs, prepare_runs
from sb3_elmur.compare.records import archive_finished, read_record, record_paths_in, restore_archived
from sb3_elmur.compare.report import TIE, write_report
from sb3_elmur.compare.spec import (
    DEFAULT_POLICIES,
    DEFAULT_POLICY_KWARGS,
    DEFAULT_PPO_KWARGS,
    POPGYM_WRAPPERS,
    build_specs,
    check_writable,
    settings_from_args,
)
from sb3_elmur.compare.worker import run_worker


def _epilog() -> str:
    paragraphs = [
        "Policies: RecurrentPPO aliases (ElmurPolicy, MlpLstmPolicy, ...) run with sb3-contrib's RecurrentPPO, PPO "
        "aliases (MlpPolicy, ...) with SB3's PPO, a dotted class path with the one its base class fits; "
        "LABEL=POLICY names a variant (e.g. elmur64=ElmurPolicy, then --policy-kwargs elmur64='{\"d_model\": 64}').",
        f"Defaults (sb3_elmur/common/presets.py, the small parameter-matched T-Maze pair): PPO kwargs "
        f"{json.dumps(DEFAULT_PPO_KWARGS)}; policy kwargs by policy name {json.dumps(DEFAULT_POLICY_KWARGS)}. "
        "Given kwargs are merged over them; a label's kwargs on the command line replace the config file's.",
        f"POPGym ids get the wrappers {', '.join(POPGYM_WRAPPERS)} unless --wrappers says otherwise "
        "(ENV=none for none).",
        "A --config file (JSON or YAML) takes the long option names with '_': envs, policies, seeds, timesteps, "
        "n_envs, eval_freq, eval_episodes, stochastic_eval, ppo_kwargs, policy_kwargs {label: {...}}, env_kwargs "
        "{env: {...}}, wrappers {env: [name or {name: kwargs}]}, gym_packages, out, archive, reference, tie, jobs, "
        "threads, device, "
        "elmur_scalars. Command-line values override it.",
        "Evaluations run at step 0, at the first rollout boundary at or after each multiple of --eval-freq, and at "
        "the end. Scores: final return (last evaluation), MMER (maximum over evaluations of the mean return) and "
        "0.5 * MMER + 0.5 (POPGym's normalisation), as mean +- std over seeds; wall time per seed includes the "
        "evaluations. A resumed run starts new episodes (and reseeds), so it is not bit-identical to an "
        "uninterrupted one. Changing the settings of existing runs is refused: use another --out. A run being "
        "trained by another invocation on the same --out is skipped (its .lock file names the process).",
        "Output in --out: runs/<env>/<label>/seed<N>.json (+ .log, .lock while running, checkpoint while "
        "unfinished, final model), tensorboard/<env>/<label>_seed<N>_1, results.md, summary.json, "
        "learning_curves.png. The report covers every run in --out, also those of earlier invocations with other "
        "policies or seeds; failed runs are marked in it. With --archive FILE, finished runs are also kept in FILE "
        "(settings, evaluations, scores, wall time; no model): commit it, and a fresh clone rebuilds the report with "
        "--report-only and resumes the comparison without redoing them.",
    ]
    return "\n\n".join(textwrap.fill(paragraph, 100, break_on_hyphens=False) for paragraph in paragraphs)


def make_parser() -> argparse.ArgumentParser:
    # The defaults are None so that a --config file can set the options; the help names the real defaults.
    parser = argparse.ArgumentParser(
        prog="python -m sb3_elmur.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    parser.add_argument(
        "--envs", nargs="+", help="env ids (gymnasium registry; POPGym ids need popgym) (no default: give them here or in "
        "--config)",
    )
    parser.add_argument("--policies", nargs="+", help="policies or LABEL=POLICY; ALGO:POLICY picks the algorithm "
                        f"(ElmurPPO:ElmurPolicy; default: RecurrentPPO or PPO) (default: {' '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0)")
    parser.add_argument("--timesteps", type=int, help="env steps per run (default: 100000)")
    parser.add_argument("--n-envs", type=int, help="parallel training envs per run (default: 8)")
    parser.add_argument(
        "--eval-freq", type=int, help="evaluate every this many env steps, at rollout boundaries (default: timesteps / 10)"
    )
    parser.add_argument("--eval-episodes", type=int, help="episodes per evaluation (default: 20)")
    parser.add_argument(
        "--stochastic-eval", action="store_true", default=None,
        help="sample actions when evaluating (default: off, greedy actions)",
    )  # fmt: skip
    parser.add_argument(
        "--ppo-kwargs", help='shared PPO / RecurrentPPO kwargs as JSON, e.g. \'{"n_steps": 256}\' (default: the presets below)'
    )
    parser.add_argument(
        "--policy-kwargs", nargs="+", metavar="LABEL=JSON",
        help='per-policy kwargs, e.g. ElmurPolicy=\'{"d_model": 32}\' (default: the presets below)',
    )  # fmt: skip
    parser.add_argument("--env-kwargs", nargs="+", metavar="ENV=JSON", help="per-env gym.make kwargs (default: none)")
    parser.add_argument(
        "--wrappers", nargs="+", metavar="ENV=NAMES",
        help="per-env comma-separated dotted wrapper classes, or ENV=none (default: the POPGym wrappers for POPGym "
        "ids, none for others)",
    )  # fmt: skip
    parser.add_argument(
        "--gym-packages", nargs="+", help="modules to import in each run (to register env ids) (default: none)"
    )
    parser.add_argument("--config", help="JSON or YAML file with any of the settings above (default: none)")
    parser.add_argument("--out", help="output folder, created if missing (default: compare_runs)")
    parser.add_argument(
        "--archive", help="JSON file keeping the records of finished runs (e.g. in git): read first, so that the runs "
        "it holds are not redone and are in the report without their run folder; each run that finishes is added "
        "(default: none)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, help="runs at a time, one process each (default: 1)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: 1)")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument(
        "--no-elmur-scalars", dest="elmur_scalars", action="store_false", default=None,
        help="do not log ELMUR's memory scalars to TensorBoard (default: logged)",
    )  # fmt: skip
    parser.add_argument(
        "--reference", metavar="LABEL", help="a policy label (e.g. MlpLstmPolicy) that the report scores the others "
        "against per env: ahead, tied or behind by the normalised MMER mean (default: none)",
    )  # fmt: skip
    parser.add_argument("--tie", type=float, help=f"with --reference: normalised MMER means this close are a tie "
                        f"(default: {TIE})")
    parser.add_argument(
        "--time-budget", type=float, help="seconds: stop cleanly after this, resume later (default: no limit)"
    )
    parser.add_argument(
        "--report-only", action="store_true",
        help="rebuild the table and plot from the runs in --out, without training (default: off)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command (or, with ``--worker``, one run in its process).

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :return: exit code: 1 if a run failed, else 0; with ``--worker``, :func:`run_worker`'s. Refused settings exit
        with 2 (``parser.error``) before any run starts.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(Path(args.worker), args.deadline, args.lock_fd)
    archive: Optional[Path] = None
    try:
        settings = settings_from_args(args)
        out = Path(settings.get("out") or "compare_runs")
        jobs = check_int("jobs", settings.get("jobs", 1))
        options = dict(
            threads=check_int("threads", settings.get("threads", 1)),
            device=settings.get("device") or "cpu",
            elmur_scalars=bool(settings.get("elmur_scalars", True)),
            # For the report: which invocation ran (or resumed) each run.
            command="python -m sb3_elmur.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
        )
        check_device(options["device"], "--device")
        if args.time_budget is not None and args.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive, got {args.time_budget}")
        specs = [] if args.report_only else build_specs(settings)
        check_writable(out)
        archive = Path(settings["archive"]) if settings.get("archive") else None
        if archive is not None:
            restored = restore_archived(out, archive, specs)
            if restored:
                print(f"{len(restored)} finished runs restored from the archive {archive}", flush=True)
            archive_finished(out, archive)  # the runs finished before this invocation, and a check that it is writable
        if args.report_only and not record_paths_in(out):
            raise ValueError(f"--report-only: no run records in {out / 'runs'}")
        reference, tie = settings.get("reference"), settings.get("tie", TIE)
        if isinstance(tie, bool) or not isinstance(tie, (int, float)) or not 0 <= tie < 1:
            raise ValueError(f"--tie must be a number in [0, 1), got {tie!r}")
        labels = {spec["label"] for spec in specs} | {path.parent.name for path in record_paths_in(out)}
        if reference is not None and reference not in labels:
            raise ValueError(f"--reference {reference}: no policy of that label in this comparison ({sorted(labels)})")
    except OSError as error:
        parser.error(f"the archive {archive}: {error.strerror or error}")
    except ValueError as error:
        parser.error(str(error))
    failed: List[Path] = []
    if not args.report_only:
        try:
            prepared = prepare_runs(out, specs, options)
        except ValueError as error:
            parser.error(str(error))
        try:
            check_runs([read_record(path)["spec"] for path in prepared.to_run])
        except ValueError as error:
            prepared.release()
            parser.error(str(error))
        try:
            busy = f"{len(prepared.busy)} running elsewhere (skipped), " if prepared.busy else ""
            print(
                f"{len(specs)} runs: {len(prepared.finished)} finished (skipped), {busy}{len(prepared.to_run)} to run",
                flush=True,
            )
            for busy in prepared.busy:
                print(f"skipped, running elsewhere: {busy}", flush=True)
            deadline = worker._clock() + args.time_budget if args.time_budget else None
            failed = launch_runs(prepared.to_run, jobs, deadline, prepared.locks, archive)
        finally:
            prepared.release()
    try:
        text = write_report(out, reference, tie)
    except ValueError as error:  # the reference's records could not be read
        parser.error(str(error))
    if args.report_only and not text:
        parser.error(f"--report-only: no readable run records in {out / 'runs'}")
    if text:
        print(text)
        print(f"table: {out / 'results.md'}, curves: {out / 'learning_curves.png'}, tensorboard: {out / 'tensorboard'}")
    for path in failed:
        print(f"FAILED: {path} (log: {path.with_suffix('.log')})", file=sys.stderr)
    return 1 if failed else 0
