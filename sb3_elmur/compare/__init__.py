"""Comparison of policies on the same env ids, budget and seeds, and its command (``python -m sb3_elmur.compare``,
described in :mod:`sb3_elmur.compare.cli`).

Modules: ``spec`` (settings -> run specs, and their checks), ``envs`` (the envs of a spec), ``records`` (a run's
files and record, and the archive of finished records), ``locks`` (a run's lock), ``worker`` (one run, in its
process), ``launcher`` (the runs' workers), ``report`` (table, summary and the verdicts against a reference),
``plot`` (curves) and ``cli`` (the command).
"""

from sb3_elmur.common.utils import zip_problem as _zip_problem
from sb3_elmur.compare.cli import main, make_parser
from sb3_elmur.compare.envs import check_runs, make_env, make_wrapper_fn
from sb3_elmur.compare.launcher import PreparedRuns, _outcome, launch_runs, prepare_runs
from sb3_elmur.compare.locks import RunLock
from sb3_elmur.compare.plot import CURVES, curve_label, plot_curves
from sb3_elmur.compare.records import (
    ARCHIVE_FORMAT,
    FAILED,
    FINISHED,
    PENDING,
    UNFINISHED,
    RunPaths,
    add_to_archive,
    archive_finished,
    check_record,
    env_slug,
    group_records,
    new_record,
    read_archive,
    read_record,
    record_paths_in,
    restore_archived,
    run_name,
    run_scores,
)
from sb3_elmur.compare.report import TIE, against_reference, evaluation_schedule, summarize, write_report, write_table
from sb3_elmur.compare.spec import (
    ALGORITHMS,
    CONFIG_KEYS,
    DEFAULT_POLICIES,
    DEFAULT_POLICY_KWARGS,
    DEFAULT_PPO_KWARGS,
    DICT_KEYS,
    LABEL_PATTERN,
    LIST_KEYS,
    POPGYM_WRAPPERS,
    RESERVED_PPO_KWARGS,
    build_specs,
    check_writable,
    load_config_file,
    parse_assignments,
    parse_json_dict,
    parse_policy_labels,
    parse_wrapper_list,
    resolve_classes,
    resolve_policy,
    settings_from_args,
)
from sb3_elmur.compare.worker import EVAL_SEED_OFFSET, load_checkpoint, run_worker

__all__ = [
    "ALGORITHMS",
    "ARCHIVE_FORMAT",
    "CONFIG_KEYS",
    "CURVES",
    "DEFAULT_POLICIES",
    "DEFAULT_POLICY_KWARGS",
    "DEFAULT_PPO_KWARGS",
    "DICT_KEYS",
    "EVAL_SEED_OFFSET",
    "FAILED",
    "FINISHED",
    "LABEL_PATTERN",
    "LIST_KEYS",
    "PENDING",
    "POPGYM_WRAPPERS",
    "PreparedRuns",
    "RESERVED_PPO_KWARGS",
    "RunLock",
    "RunPaths",
    "TIE",
    "UNFINISHED",
    "add_to_archive",
    "against_reference",
    "archive_finished",
    "build_specs",
    "check_record",
    "check_runs",
    "check_writable",
    "curve_label",
    "env_slug",
    "evaluation_schedule",
    "group_records",
    "launch_runs",
    "load_checkpoint",
    "load_config_file",
    "main",
    "make_env",
    "make_parser",
    "make_wrapper_fn",
    "new_record",
    "parse_assignments",
    "parse_json_dict",
    "parse_policy_labels",
    "parse_wrapper_list",
    "plot_curves",
    "prepare_runs",
    "read_archive",
    "read_record",
    "record_paths_in",
    "resolve_classes",
    "resolve_policy",
    "restore_archived",
    "run_name",
    "run_scores",
    "run_worker",
    "settings_from_args",
    "summarize",
    "write_report",
    "write_table",
]
# Private names that code written against the single-module compare.py reads here.
__all__ += ["_outcome", "_zip_problem"]
