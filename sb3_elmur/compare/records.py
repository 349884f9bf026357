"""The files of one run (record, log, checkpoint, model) and its JSON record."""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sb3_elmur.common.utils import exclusive_lock, write_json_atomically

FINISHED, UNFINISHED, FAILED, PENDING = "finished", "unfinished", "failed", "pending"


def env_slug(env_id: str) -> str:
    """Folder name of an env id (``sb3_elmur/TMaze-v0`` -> ``sb3_elmur-TMaze-v0``)."""
    return env_id.replace("/", "-").replace(":", "-")


class RunPaths:
    """Where one run keeps its files.

    :param out: output folder of the comparison
    :param spec: the run's spec
    """

    def __init__(self, out: Path, spec: Dict[str, Any]) -> None:
        folder = Path(out) / "runs" / env_slug(spec["env_id"]) / spec["label"]
        stem = f"seed{spec['seed']}"
        self.record = folder / f"{stem}.json"
        self.lock = folder / f"{stem}.lock"
        self.log = folder / f"{stem}.log"
        self.checkpoint = folder / f"{stem}_checkpoint.zip"
        self.model = folder / f"{stem}_model.zip"
        self.tensorboard = Path(out) / "tensorboard" / env_slug(spec["env_id"])
        self.tb_log_name = f"{spec['label']}_seed{spec['seed']}"


def read_record(path: Path) -> Dict[str, Any]:
    """The JSON record of a run, with an error naming the file if it cannot be read."""
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the run record {path} ({error}); delete it to redo the run") from error
    check_record(record, f"the run record {path}", "delete it to redo the run")
    return record


def check_record(record: Any, name: str, remedy: str) -> None:
    """Fail with an error naming ``name`` and ``remedy`` unless ``record`` holds what the report reads (an edited
    or cut record is named, not a KeyError there)."""
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "status" not in record:
        raise ValueError(f"{name} is not a run record of sb3_elmur.compare; {remedy}")
    evaluations = record.get("evaluations")
    missing = [key for key in ("timesteps", "mean_return") if not isinstance(evaluations, dict)
               or not isinstance(evaluations.get(key), list)]
    missing += [key for key in ("env_id", "label", "policy", "algo", "seed", "timesteps", "eval_freq")
                if key not in record["spec"]]
    if record["status"] == FINISHED:
        missing += [key for key in ("final_mean_return", "mmer", "mmer_normalised", "wall_time_s") if key not in record]
    if missing:
        raise ValueError(
            f"{name} lacks {', '.join(missing)} (evaluations.timesteps and evaluations.mean_return are lists in every "
            f"record); {remedy}"
        )


def record_paths_in(out: Path) -> List[Path]:
    """The run records in the output folder ``out`` (of this and earlier invocations)."""
    return sorted((Path(out) / "runs").glob("*/*/seed*.json"))


def new_record(spec: Dict[str, Any], options: Dict[str, Any]) -> Dict[str, Any]:
    """The record of a run that no session has worked on yet."""
    return dict(
        spec=spec,
        options=options,
        status=PENDING,
        num_timesteps=0,
        evaluations=dict(timesteps=[], mean_return=[], std_return=[], mean_length=[]),
        wall_time_s=0.0,
        eval_time_s=0.0,
        sessions=0,
    )


def final_success(record: Dict[str, Any]) -> Optional[float]:
    """The success rate of a run's last evaluation (None: the env reports no ``is_success``, or no evaluation)."""
    return (record["evaluations"].get("success_rate") or [None])[-1]


def last_error_line(record: Dict[str, Any]) -> Optional[str]:
    """The last line of a failed run's error (the exception), or None if none was recorded."""
    lines = [line for line in str(record.get("error", "")).splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def run_name(spec: Dict[str, Any]) -> str:
    """How the console names a run: ``"sb3_elmur/PassiveTMaze-v0 ElmurPolicy seed 0"``."""
    return f"{spec['env_id']} {spec['label']} seed {spec['seed']}"


def group_records(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str], List[Dict[str, Any]]]:
    """Records by env id, policy label and all other settings but the seed: runs with other settings (e.g. of
    other invocations on the same ``--out``) are never averaged together."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for record in records:
        spec = record["spec"]
        settings = json.dumps({key: value for key, value in spec.items() if key != "seed"}, sort_keys=True)
        groups.setdefault((spec["env_id"], spec["label"], settings), []).append(record)
    return groups


def run_scores(mean_returns: Sequence[float]) -> Dict[str, float]:
    """Scores of one run from its evaluation history.

    :param mean_returns: mean evaluation return at each evaluation point, in order
    :return: ``final_mean_return`` (the last one), ``mmer`` (POPGym's MMER: the maximum over evaluation points,
        i.e. the final value of their running maximum) and ``mmer_normalised`` (0.5 * MMER + 0.5, POPGym's score
        for returns in [-1, 1])
    """
    if len(mean_returns) == 0:
        raise ValueError("a run without evaluations has no score")
    mmer = float(max(mean_returns))
    return dict(final_mean_return=float(mean_returns[-1]), mmer=mmer, mmer_normalised=0.5 * mmer + 0.5)


def spec_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """The settings in which two run specs differ, sorted."""
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))



# The archive: one JSON file (e.g. committed to git) holding the records of finished runs, so that a fresh clone or
# another machine rebuilds the report, and skips those runs, without their run folder.
ARCHIVE_FORMAT = "sb3_elmur.compare archive 1"


def read_archive(archive: Path) -> List[Dict[str, Any]]:
    """The finished run records kept in the archive file ``archive`` (none if the file does not exist yet)."""
    if not archive.exists():
        return []
    remedy = "fix or move the file (--archive names another)"
    try:
        with open(archive) as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the archive {archive} ({error}); {remedy}") from error
    if not isinstance(data, dict) or data.get("format") != ARCHIVE_FORMAT or not isinstance(data.get("records"), list):
        raise ValueError(f"{archive} is not an archive of sb3_elmur.compare ({ARCHIVE_FORMAT!r}); {remedy}")
    for number, record in enumerate(data["records"]):
        check_record(record, f"record {number} of the archive {archive}", remedy)
        if record["status"] != FINISHED:
            raise ValueError(f"record {number} of the archive {archive} is {record['status']}, not finished; {remedy}")
    return data["records"]


def restore_archived(out: Path, archive: Path, specs: Sequence[Dict[str, Any]] = ()) -> List[Path]:
    """Write into ``out`` the archived records whose run has no record there, so that they count as finished.

    :param out: output folder of the comparison
    :param archive: the archive file
    :param specs: the runs of this invocation: an archived run with other settings is refused, as in ``out``
    :return: the record paths written
    """
    by_path = {RunPaths(out, spec).record: spec for spec in specs}
    records = read_archive(archive)
    conflicts = []
    for record in records:
        path = RunPaths(out, record["spec"]).record
        current = read_record(path)["spec"] if path.exists() else by_path.get(path)
        if current is not None and current != record["spec"]:
            differences = spec_differences(current, record["spec"])
            conflicts.append(f"{run_name(record['spec'])} (differs in {', '.join(differences)})")
    if conflicts:
        raise ValueError(f"the archive {archive} holds these runs with other settings; use another --archive (or "
                         "--out, settings):\n  " + "\n  ".join(conflicts))
    restored = []
    for record in records:
        path = RunPaths(out, record["spec"]).record
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, record)
            restored.append(path)
    return restored


def add_to_archive(archive: Path, records: Sequence[Dict[str, Any]]) -> None:
    """Add (or replace, by env id, label and seed) finished run records in the archive file, atomically.

    Two invocations may add at the same moment (their ``--out`` differ, their archive not): the read, change and
    write happen under a lock beside the archive (``.<name>.lock``, removed afterwards), so neither loses the
    other's records.
    """
    for record in records:
        if record["status"] != FINISHED:
            raise ValueError(f"only finished runs are archived; {run_name(record['spec'])} is {record['status']}")
    def key(record: Dict[str, Any]) -> Tuple[str, str, int]:
        return record["spec"]["env_id"], record["spec"]["label"], record["spec"]["seed"]

    with exclusive_lock(archive.with_name(f".{archive.name}.lock"), wait=True):
        kept = {key(record): record for record in read_archive(archive)}
        kept.update((key(record), record) for record in records)
        write_json_atomically(archive, dict(format=ARCHIVE_FORMAT, records=[kept[key] for key in sorted(kept)]))


def archive_finished(out: Path, archive: Path) -> None:
    """Add the finished runs of ``out`` (of this and earlier invocations) to the archive file."""
    records = [read_record(path) for path in record_paths_in(out)]
    add_to_archive(archive, [record for record in records if record["status"] == FINISHED])
