"""Launching the runs of a comparison: their files and locks, one worker process per run, ``jobs`` at a time,
and a console line per start, evaluation and end."""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from sb3_elmur.common.utils import write_json_atomically
from sb3_elmur.compare import worker
from sb3_elmur.compare.locks import RunLock
from sb3_elmur.compare.records import (
    FINISHED,
    UNFINISHED,
    RunPaths,
    add_to_archive,
    final_success,
    last_error_line,
    new_record,
    read_record,
    run_name,
    spec_differences,
)


class PreparedRuns(NamedTuple):
    """What :func:`prepare_runs` found: the runs to launch (their locks held), and those to leave alone."""

    to_run: List[Path]
    finished: List[Path]
    busy: List[str]  # "<record> (locked by <holder>)", runs that another process is running
    locks: Dict[Path, RunLock]  # record path -> its lock, held for the runs to launch

    def release(self) -> None:
        for lock in self.locks.values():
            lock.release()


def prepare_runs(out: Path, specs: List[Dict[str, Any]], options: Dict[str, Any]) -> PreparedRuns:
    """Create or check the run files and lock the runs to launch.

    Finished runs are skipped, and so are runs locked by another process (another invocation on the same
    ``out``), which would otherwise be trained twice at once.

    :param out: output folder of the comparison
    :param specs: the run specs (:func:`build_specs`)
    :param options: the runs' process options (threads, device, elmur_scalars)
    :return: the runs to launch (locked, until :meth:`PreparedRuns.release` or the process ends), the finished
        ones and the busy ones
    """
    conflicts = []
    for spec in specs:
        paths = RunPaths(out, spec)
        if paths.record.exists():
            differences = spec_differences(read_record(paths.record)["spec"], spec)
            if differences:
                conflicts.append(f"{paths.record} (differs in {', '.join(differences)})")
    if conflicts:
        raise ValueError(
            "these runs exist with other settings; use another --out or delete them:\n  " + "\n  ".join(conflicts)
        )
    prepared = PreparedRuns([], [], [], {})
    try:
        for spec in specs:
            paths = RunPaths(out, spec)
            lock = RunLock(paths.lock)
            if not lock.acquire():
                prepared.busy.append(f"{paths.record} (locked by {lock.holder()})")
                continue
            prepared.locks[paths.record] = lock
            # Read under the lock: another process may have finished the run since.
            if paths.record.exists():
                record = read_record(paths.record)
                if record["status"] == FINISHED:
                    prepared.locks.pop(paths.record).release()
                    prepared.finished.append(paths.record)
                    continue
                record["options"] = options
            else:
                record = new_record(spec, options)
            write_json_atomically(paths.record, record)
            prepared.to_run.append(paths.record)
    except BaseException:
        prepared.release()
        raise
    return prepared


class _Running(NamedTuple):
    """A launched worker, and what the console has said of it."""

    process: subprocess.Popen
    path: Path
    log: Any
    tag: str  # "[2/6] <run name>"
    timesteps: int  # the run's budget of env steps
    evaluations_shown: List[int]  # one element: how many of its evaluations the console has shown
    record_mtime: List[int]  # one element: the record's mtime when last read


def _evaluations_in(path: Path) -> List[Tuple[int, float]]:
    """The (step, mean return) evaluations in the record ``path`` (none if it cannot be read now)."""
    try:
        evaluations = read_record(path)["evaluations"]
    except ValueError:
        return []
    return list(zip(evaluations["timesteps"], evaluations["mean_return"]))


def _show_progress(run: _Running) -> None:
    """Print the evaluations a running worker has added to its record since the last look: one line each."""
    try:
        mtime = run.path.stat().st_mtime_ns
    except OSError:
        return
    if mtime == run.record_mtime[0]:
        return
    run.record_mtime[0] = mtime
    evaluations = _evaluations_in(run.path)
    run.evaluations_shown[0] = min(run.evaluations_shown[0], len(evaluations))  # a run restarted from step 0
    for step, mean_return in evaluations[run.evaluations_shown[0]:]:
        print(f"{run.tag}: step {step:,}/{run.timesteps:,}, mean return {mean_return:.3f}", flush=True)
    run.evaluations_shown[0] = len(evaluations)


def _outcome(path: Path, returncode: int) -> Tuple[str, bool]:
    """The console's line on a worker that ended (after its tag), and whether the run failed."""
    log = path.with_suffix(".log")
    try:
        record = read_record(path)
    except ValueError as error:
        return f"FAILED (exit code {returncode}): {error} (log: {log})", True
    status = record["status"]
    if status == FINISHED and returncode == 0:
        success = final_success(record)
        return (f"finished in {record['wall_time_s']:.0f} s: final mean return {record['final_mean_return']:.3f}, "
                f"MMER {record['mmer']:.3f}" + (f", success {success:.2f}" if success is not None else ""), False)
    if status == UNFINISHED and returncode == 0:
        return (f"stopped at step {record['num_timesteps']:,} of {record['spec']['timesteps']:,} (time budget): the "
                "same command resumes it", False)
    error = last_error_line(record)
    why = f": {error}" if error else ""
    return f"FAILED ({status}, exit code {returncode}){why} (log: {log})", True


def launch_runs(
    record_paths: List[Path],
    jobs: int,
    deadline: Optional[float],
    locks: Optional[Dict[Path, RunLock]] = None,
    archive: Optional[Path] = None,
) -> List[Path]:
    """Run the workers, ``jobs`` at a time. The console gets one line when a run starts, one per evaluation (read
    from its record) and one when it ends, with its scores or why it failed; the rest of a worker's output goes to
    its log.

    :param record_paths: the runs
    :param jobs: how many at a time
    :param deadline: Unix time after which no run starts and the running ones stop cleanly
    :param locks: the runs' locks (record path -> lock), handed down to their workers and released (their files
        removed) when they end
    :param archive: the archive file that each finished run's record is added to (default: none)
    :return: the record paths of runs that failed
    """
    locks = locks or {}
    pending = list(enumerate(record_paths, 1))
    running: List[_Running] = []
    failed = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        while pending or running:
            while pending and len(running) < jobs and (deadline is None or worker._clock() < deadline):
                number, path = pending.pop(0)
                log = open(path.with_suffix(".log"), "a")
                command = [sys.executable, "-m", "sb3_elmur.compare", "--worker", str(path)]
                if deadline is not None:
                    command += ["--deadline", repr(deadline)]
                lock = locks.get(path)
                if lock is not None and lock.fd is not None:
                    # The worker shares the lock: it stays held if this process is killed while the worker trains.
                    command += ["--lock-fd", str(lock.fd)]
                pass_fds = [lock.fd] if lock is not None and lock.fd is not None else []
                spec = read_record(path)["spec"]
                tag = f"[{number}/{len(record_paths)}] {run_name(spec)}"
                print(f"{tag}: start (log: {path.with_suffix('.log')})", flush=True)
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
                shown = len(_evaluations_in(path))  # a resumed run's earlier evaluations were shown in their session
                running.append(_Running(process, path, log, tag, int(spec["timesteps"]), [shown], [0]))
            if deadline is not None and worker._clock() >= deadline and pending:
                print(f"time budget spent: {len(pending)} run(s) not started", flush=True)
                pending.clear()
            still_running = []
            for run in running:
                if run.process.poll() is None:
                    _show_progress(run)
                    still_running.append(run)
                    continue
                run.log.close()
                if run.path in locks:
                    locks[run.path].release()  # the worker has ended: its lock file goes too
                _show_progress(run)
                line, run_failed = _outcome(run.path, run.process.returncode)
                print(f"{run.tag}: {line}", flush=True)
                if run_failed:
                    failed.append(run.path)
                elif archive is not None:
                    record = read_record(run.path)
                    if record["status"] == FINISHED:
                        add_to_archive(archive, [record])
            running = still_running
            if running:
                time.sleep(0.2)
    finally:
        # Interrupted (Ctrl-C, an error here): a worker still running shares its run's lock, so the lock file stays
        # where others open it. (Those that ended are released, their files removed, by the caller.)
        for run in running:
            if run.process.poll() is None and run.path in locks:
                locks[run.path].release(remove=False)
            run.log.close()
    return failed
