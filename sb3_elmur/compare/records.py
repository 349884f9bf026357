"""The files of one run (record, log, checkpoint, model) and its JSON record."""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "status" not in record:
        raise ValueError(f"{path} is not a run record of sb3_elmur.compare; delete it to redo the run")
    # The report reads these: a record without them (edited, or cut by hand) is named, not a KeyError there.
    evaluations = record.get("evaluations")
    missing = [key for key in ("timesteps", "mean_return") if not isinstance(evaluations, dict)
               or not isinstance(evaluations.get(key), list)]
    missing += [key for key in ("env_id", "label", "policy", "algo", "seed", "timesteps", "eval_freq")
                if key not in record["spec"]]
    if record["status"] == FINISHED:
        missing += [key for key in ("final_mean_return", "mmer", "mmer_normalised", "wall_time_s") if key not in record]
    if missing:
        raise ValueError(
            f"the run record {path} lacks {', '.join(missing)} (evaluations.timesteps and evaluations.mean_return are "
            "lists in every record); delete it to redo the run"
        )
    return record


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

