"""Small helpers shared by the command-line tools."""

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_elmur.common.checks import check_int

# Attributes only a RecurrentBC save holds: how a zip (which names no algorithm) is told to be one.
_RECURRENT_BC_KEYS = {"sections", "continuous_loss", "detach_between_sections"}
# Tag of the temporary files of atomic writes (".seed0.json.<random>.tmp.json").
TMP_TAG = ".tmp"


class LockedError(FileExistsError):
    """Another process (or another open of the file in this one) holds an :func:`exclusive_lock`."""


def open_locked(path: Path, wait: bool = False) -> Optional[int]:
    """An open descriptor of the lock file ``path`` (created, and its folder) with an exclusive ``flock`` on it, or
    None if another process (or another open of the file in this one) holds it (with ``wait``: wait for it).

    :param path: the lock file
    :param wait: wait until the holder releases it, instead of returning None
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us removes the file before it unlocks: a lock on a file no longer at ``path`` locks
        # nothing that others see, so open the current one again.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created, with this process's pid in it, and removed on
    release), or refuse at once if it is held (with ``wait``: wait for it).

    flock, not a file created with O_EXCL: the kernel releases it when its holder dies, so a killed process leaves
    no lock that blocks the next run (only, at worst, a stale file, which the next holder takes over).

    :param path: the lock file (its folder is created)
    :param wait: wait until the holder releases it, instead of refusing (processes taking turns at a shared file)
    :raise LockedError: if the lock is held and not ``wait``; the message names the file and the holder's pid
    """
    path = Path(path)
    fd = open_locked(path, wait)
    if fd is None:
        try:
            holder = f"process {int(path.read_text())}"
        except (OSError, ValueError):  # not written yet, or removed meanwhile
            holder = "another process"
        raise LockedError(f"{holder} holds the lock {path}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(path)  # still locked: a process that opened it meanwhile finds it gone and opens a new one
        os.close(fd)


# Folders of earlier versions' staging (made without a lock) are taken for abandoned once this old: no write or
# install takes a day.
LEGACY_STAGING_AGE_S = 24 * 3600
# The random part of a folder made by ``tempfile.mkdtemp``, as earlier versions named their staging folders.
_MKDTEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")


def _lock_folder(path: Path, blocking: bool) -> Optional[int]:
    """An open descriptor of the folder ``path`` with an exclusive ``flock`` on it, or None if another process holds
    it (``blocking``: wait for it instead) or the folder cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another process
        os.close(fd)
        return None
    return fd


def remove_stale_staging_folders(
    parent: Path, prefix: str, legacy_prefix: Optional[str] = None, salvage: Optional[Callable[[Path], bool]] = None
) -> List[Path]:
    """Remove the staging folders (:func:`staging_folder`) named ``<prefix>...`` in ``parent`` that processes killed
    while writing left behind: those whose lock nobody holds (the kernel releases the lock of a process that dies),
    so never the folder of a live writer, in this process or another. With ``legacy_prefix``, also the folders of
    earlier versions (``<legacy_prefix>`` and the 8 random characters of ``tempfile.mkdtemp``, made without a lock)
    once older than :data:`LEGACY_STAGING_AGE_S`.

    :param salvage: called with each stale folder before it is removed (under its lock), to move out what must not
        be lost; it returns whether the folder may be removed (False: it is kept)
    :return: the folders removed
    """
    removed = []
    try:
        candidates = sorted(Path(parent).iterdir())
    except OSError:  # no folder yet, or not readable: nothing of ours to clean
        return removed
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        if path.name.startswith(prefix):
            fd = _lock_folder(path, blocking=False)
            if fd is None:  # a live writer's
                continue
            try:
                if salvage is None or salvage(path):
                    shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)
        elif legacy_prefix is not None and path.name.startswith(legacy_prefix):
            if not _MKDTEMP_SUFFIX.fullmatch(path.name[len(legacy_prefix):]):
                continue
            try:
                if time.time() - path.stat().st_mtime < LEGACY_STAGING_AGE_S:
                    continue
            except OSError:
                continue
            if salvage is None or salvage(path):
                shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        if not path.exists():
            removed.append(path)
    return removed


@contextlib.contextmanager
def staging_folder(
    parent: Path, prefix: str, legacy_prefix: Optional[str] = None, salvage: Optional[Callable[[Path], bool]] = None
) -> Iterator[Path]:
    """A new folder ``<parent>/<prefix><random>`` to put something together in before moving it into place (a
    dataset, an install), removed on exit unless moved away. It is held under an exclusive ``flock`` while in use,
    which tells a later call that its writer is alive: first, the staging folders of ``prefix`` that killed
    processes left are removed (:func:`remove_stale_staging_folders`).

    :param parent: where to make it (on the file system of its destination, so that the final move is a rename)
    :param prefix: start of its name (hidden: starts with ".")
    :param legacy_prefix: start of the names of earlier versions' staging folders, to clean too
    :param salvage: see :func:`remove_stale_staging_folders`
    :raise OSError: if ``parent`` cannot be written
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging_folders(parent, prefix, legacy_prefix, salvage)
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = _lock_folder(path, blocking=True)
        if fd is None and path.exists():
            shutil.rmtree(path, ignore_errors=True)
            raise OSError(f"cannot lock the staging folder {path}")
        # Between mkdtemp and the lock, another process's clean-up may have taken the folder for abandoned and
        # removed it (it holds the lock while removing): make another one.
        try:
            current = fd is not None and os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        if fd is not None:
            os.close(fd)
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)  # nothing there if it was moved into place
        finally:
            os.close(fd)


def code_commit(folder: Union[str, Path]) -> str:
    """Short hash of the git commit checked out at ``folder``, for result files; "unknown" outside a git checkout."""
    result = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def positive_int_argument(text: str) -> int:
    """argparse type: an integer >= 1, so that a bad count stops a command before anything loads."""
    try:
        return check_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None


def algorithm_class(name: str) -> type:
    """An algorithm class by name, looked up in sb3_elmur, sb3_contrib and stable_baselines3."""
    import sb3_contrib
    import stable_baselines3

    import sb3_elmur

    for module in (sb3_elmur, sb3_contrib, stable_baselines3):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseAlgorithm):
            return cls
    raise ValueError(f"unknown algorithm {name!r}: expected a class of sb3_elmur, sb3_contrib or stable_baselines3")


def zip_path(path: Union[str, Path]) -> Path:
    """The file SB3's ``load`` reads for ``path`` (it adds the suffix ``.zip`` to a path that is not a file)."""
    path = Path(path)
    return path if path.is_file() else path.with_name(path.name + ".zip")


def zip_problem(path: Union[str, Path]) -> Optional[str]:
    """What is wrong with the zip file ``path`` (truncated, not a zip, a corrupt member, no readable ``data``), or
    None if it is sound: SB3's load of such a file fails deep in zipfile, json or torch."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
            # SB3's load reads the JSON member "data" first: one it cannot parse fails deep in json or SB3.
            data = archive.read("data") if corrupt is None else None
    except KeyError:
        # (A truncated model zip can read as the torch archive inside it, which has no 'data'.)
        return "no member 'data': truncated, or not a model saved by Stable-Baselines3"
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    if corrupt is not None:
        return f"corrupt member {corrupt}"
    try:
        if not isinstance(json.loads(data), dict):
            return "its member 'data' is not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its member 'data' is not readable JSON ({error})"
    return None


def _saved_contents(path: Union[str, Path]) -> Optional[Tuple[Set[str], Set[str]]]:
    """The attribute names and the state-dict names (``policy``, ``policy.optimizer``, ...) a SB3 zip holds,
    or None if it cannot be read as one."""
    path = zip_path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            keys = set(json.loads(archive.read("data")))
            return keys, {Path(name).stem for name in archive.namelist() if name.endswith(".pth")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def load_algorithm(name: str, path: Union[str, Path], **kwargs: Any) -> BaseAlgorithm:
    """Load a saved model with the ``load`` of the algorithm class called ``name``.

    :raise ValueError: if ``name`` is unknown, if the file is not a sound zip (truncated, corrupt: named before SB3
        fails deep inside zipfile or torch), or if the zip is a RecurrentBC model that this class cannot load (the
        message says what to call instead)
    """
    from sb3_elmur.bc import RecurrentBC

    cls = algorithm_class(name)
    if zip_path(path).is_file():  # a missing file is left to SB3's own error
        problem = zip_problem(zip_path(path))
        if problem is not None:
            raise ValueError(
                f"{zip_path(path)} is not a readable saved model ({problem}): the file is truncated or damaged (an "
                "interrupted save or copy?); save or copy it again"
            )
    try:
        return cls.load(path, **kwargs)
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as error:
        contents = _saved_contents(path)
        if contents is None or issubclass(cls, RecurrentBC) or not _RECURRENT_BC_KEYS <= contents[0]:
            raise
        old = "policy.optimizer" not in contents[1]
        raise ValueError(
            f"{path} holds a RecurrentBC model{' saved without its optimizer state (sb3-elmur 0.1.0)' if old else ''}, "
            f"which {cls.__name__}.load cannot read ({type(error).__name__}: {error}): load it with "
            f"RecurrentBC.load (command line: --algo RecurrentBC), then call its to_recurrent_ppo(env) for a "
            f"RecurrentPPO{'; or load it and save it again, which RecurrentPPO.load reads' if old else ''}"
        ) from error


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file so that a kill at any point leaves either the old file or the new one, never a truncated one.

    :param path: the file to (re)write
    :param write: writes the content to the path it is given (a temporary file in the same folder, with the
        same suffix, so that e.g. ``model.save`` keeps the name as given), then ``os.replace`` moves it in place
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and ending in ".tmp<suffix>", so that the globs for run records never pick up a leftover; created
    # by ``write`` itself (not mkstemp), so that the file gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_TAG}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=1))


def remove_leftover_temp_files(path: Path) -> List[Path]:
    """Delete the temporary files that a killed :func:`write_atomically` of ``path`` left behind.

    Only call this while nobody else can be writing ``path`` (e.g. holding the run's lock).

    :return: the files removed
    """
    leftovers = sorted(path.parent.glob(f".{path.name}.*{TMP_TAG}{path.suffix}"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def train_and_evaluate_once(
    name: str,
    out: Path,
    train: Callable[[Path], Dict[str, Any]],
    load: Callable[[Path], Any],
    evaluate: Callable[[Any, int], Dict[str, Any]],
    points: Sequence[int],
    redo: Sequence[int] = (),
    settings: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A long offline benchmark's unit of work, resumable: train one model once (``<out>/<name>.zip``, ``train``'s
    figures kept in ``<out>/<name>.json``), then evaluate it once at each of ``points`` (corridor or episode
    lengths) not yet in that record, or in ``redo``; the record is rewritten atomically after every step.

    :param train: trains and saves the model to the path given; returns its figures (time, parameters, ...)
    :param load: loads the saved model
    :param evaluate: (model, point) -> the figures of that evaluation (``{"success": ..., ...}``)
    :param settings: what defines the model (budget, task, ...), kept in the record: a record made with other
        values is refused, so that one folder never mixes results of different settings
    :return: the record: ``train``'s figures, ``settings`` and ``{"evaluations": {point: figures}}``
    """
    problem = record_problem(out, name, settings or {})
    if problem is not None:
        raise ValueError(problem)
    record_path, model_path = out / f"{name}.json", out / f"{name}.zip"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"evaluations": {}}
    if not model_path.exists():
        record.update(settings or {})
        record.update(train(model_path))
        write_json_atomically(record_path, record)
        print(f"{name}: trained ({record})", flush=True)
    model = load(model_path)
    for point in points:
        if str(point) in record["evaluations"] and point not in redo:
            continue
        record["evaluations"][str(point)] = evaluate(model, point)
        write_json_atomically(record_path, record)
        print(f"{name} at {point:,}: {record['evaluations'][str(point)]}", flush=True)
    return record


def record_problem(out: Path, name: str, settings: Dict[str, Any]) -> Optional[str]:
    """Why :func:`train_and_evaluate_once` would refuse ``<out>/<name>`` (None if it would not): a record made with
    other ``settings``, or evaluations whose model is lost (a new model's results must not join them). Benchmarks
    ask it for every unit before any work."""
    record_path, model_path = out / f"{name}.json", out / f"{name}.zip"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    for key, value in settings.items():
        if key in record and record[key] != value:
            return f"{record_path} was made with {key}={record[key]!r}, not {value!r}: use another folder"
    if not model_path.exists() and record["evaluations"]:
        return (f"{model_path} is missing but {record_path} holds its evaluations: use another folder to train again, "
                "or delete the record")
    return None


def refuse_record_problems(parser: Any, units: Iterable[Tuple[Path, str]], settings: Dict[str, Any]) -> None:
    """``parser.error`` (exit 2) on the first :func:`record_problem` of ``units`` ((folder, name) pairs), so that a
    benchmark refuses before any work rather than after hours of it."""
    for out, name in units:
        problem = record_problem(out, name, settings)
        if problem is not None:
            parser.error(problem)


def success_table_rows(out: Path) -> Tuple[List[int], List[Tuple[str, str, Dict[str, Any], List[str]]]]:
    """The records of :func:`train_and_evaluate_once` in ``out`` (``<name>_s<seed>.json``) as table rows.

    :return: the evaluation points of any record, sorted, and per record (name, seed, record, success cells with
        "-" where a point is not evaluated yet)
    """
    records = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*_s*.json"))}
    points = sorted({int(point) for record in records.values() for point in record["evaluations"]})
    rows = []
    for stem, record in records.items():
        name, seed = stem.rsplit("_s", 1)
        evaluations = record["evaluations"]
        cells = [f"{evaluations[str(p)]['success']:.2f}" if str(p) in evaluations else "-" for p in points]
        rows.append((name, seed, record, cells))
    return points, rows


def plot_success_by_length(out: Path, path: Path, title: str) -> None:
    """Plot the records of :func:`train_and_evaluate_once` in ``out``: success against the evaluation length (log
    scale), one line per configuration (the mean over its seeds, at the lengths all of them reached) over each
    seed's own points; written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, rows = success_table_rows(out)
    runs: Dict[str, List[Dict[int, float]]] = {}
    for name, _, record, _ in rows:
        runs.setdefault(name, []).append({p: record["evaluations"][str(p)]["success"]
                                          for p in points if str(p) in record["evaluations"]})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, seeds) in enumerate(sorted(runs.items())):
        for seed in seeds:
            ax.plot(list(seed), list(seed.values()), color=f"C{i}", alpha=0.3, marker=".", linewidth=1)
        common = sorted(set.intersection(*(set(seed) for seed in seeds)))
        mean = [sum(seed[p] for seed in seeds) / len(seeds) for p in common]
        ax.plot(common, mean, color=f"C{i}", marker="o", linewidth=2, label=f"{name} (mean of {len(seeds)} seeds)")
    ax.set(xscale="log", ylim=(0.0, 1.05), xlabel="episode length at evaluation (steps)", ylabel="success", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def new_report_path(parser: Any, out: Union[str, Path], overwrite: bool) -> Path:
    """The path of a benchmark's report, refused (``parser.error``: exit 2, before any work) if it exists and
    ``overwrite`` is not set, so that earlier results are never erased by accident."""
    path = Path(out)
    if path.exists() and not overwrite:
        parser.error(f"{path} exists: pass --overwrite to replace it, or --out another file")
    return path
