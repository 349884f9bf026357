"""Minari I/O of episode datasets: safe writes (staging folder, exclusive lock, nothing replaced half-way) and
dataset ids checked before any work."""

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from sb3_elmur.common.utils import LockedError, exclusive_lock

# Minari reminds about unset optional metadata (author, code_permalink, ...) on every write: not faults.
_MINARI_METADATA_REMINDERS = r"`\w+` is set to None"
# Staging folders of dataset writes in Minari's datasets folder: hidden (Minari lists only the folders that are not),
# locked while in use, removed by the next write if their writer was killed.
STAGING_PREFIX = ".sb3_elmur-staging-"


def _restore_replaced(staging: Path) -> bool:
    """Put back the dataset that a killed write had moved aside (into its staging folder) to replace it, if the new
    one never took its place: the clean-up of the staging folder must not delete it.

    :return: whether the staging folder may be removed: not if it holds a dataset moved aside whose place is not
        known (written by an earlier version, which did not record it)
    """
    replaced, target_file = staging / "replaced", staging / "target"
    if not replaced.is_dir():
        return True
    if not target_file.is_file():
        return False
    target = Path(target_file.read_text())
    if not target.exists():
        os.replace(replaced, target)
        print(f"restored the Minari dataset at {target}, which an interrupted write had moved to {staging}")
    return True


@contextlib.contextmanager
def _exclusive_write(dataset_id: str, root: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing ``dataset_id`` into the datasets folder ``root`` (a hidden lock file there,
    removed on release), or refuse at once if another process holds it.

    :param dataset_id: the Minari id being written
    :param root: Minari's datasets folder
    :raise FileExistsError: if another write of ``dataset_id`` holds the lock
    """
    # Hidden: Minari lists only the folders that are not. '+' cannot occur in an id: two ids never share a lock.
    path = root / f".sb3_elmur-lock-{dataset_id.replace('/', '+')}"
    try:
        with exclusive_lock(path):
            yield  # the write raises no LockedError of its own: one here is the lock's
    except LockedError as error:
        raise FileExistsError(
            f"the Minari dataset {dataset_id!r} is being written by another process ({error}): wait for it to "
            "finish (then pass overwrite=True, command line: --overwrite, to replace its dataset), or write another id"
        ) from None


def _import_minari() -> Any:
    try:
        import minari
    except ImportError as error:
        raise ImportError(f"Minari datasets need minari: pip install 'sb3-elmur[offline]' ({error})") from error
    return minari


@contextlib.contextmanager
def _minari_datasets_path(path: Path) -> Iterator[None]:
    """Point Minari (which reads MINARI_DATASETS_PATH at every call) at another datasets folder for a while."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def check_minari_id(dataset_id: str, overwrite: bool = False) -> Path:
    """Check that ``dataset_id`` is a well-formed Minari id that can be written, before any long work.

    :param dataset_id: Minari id, ``(namespace/)name-vN``
    :param overwrite: whether an existing dataset with this id may be replaced
    :return: the folder the dataset will be written to
    :raise ValueError: if the id is malformed
    :raise FileExistsError: if the dataset exists and ``overwrite`` is False
    """
    _import_minari()
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage import get_dataset_path

    try:
        parse_dataset_id(dataset_id)
    except (TypeError, ValueError):  # TypeError: no version (Minari's regex allows it, its int() does not)
        raise ValueError(
            f"malformed Minari dataset id {dataset_id!r}: ids are (namespace/)name-vVERSION of letters, digits, "
            "'-' and '_', namespaces of two characters or more, e.g. 'tmaze/oracle-v0'"
        ) from None
    path = Path(get_dataset_path(dataset_id))
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"the Minari dataset {dataset_id!r} already exists at {path}: pass overwrite=True (command line: "
            f"--overwrite) to replace it, or load it with EpisodeDataset.from_minari({dataset_id!r})"
        )
    return path


