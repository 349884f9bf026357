"""The report of a comparison: the markdown table and the JSON summary of every run record in its folder, and
the curves (:mod:`sb3_elmur.compare.plot`)."""

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sb3_elmur.common.utils import write_json_atomically, write_text_atomically
from sb3_elmur.compare.plot import plot_curves
from sb3_elmur.compare.records import (
    FAILED,
    FINISHED,
    RunPaths,
    final_success,
    group_records,
    last_error_line,
    read_record,
    record_paths_in,
    run_name,
)


# Normalised MMERs (POPGym's 0.5 * MMER + 0.5) this close are a tie: the POPGym comparison's rule.
TIE = 0.005


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summarize(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per :func:`group_records` group (env, policy label and settings): mean and std over finished seeds
    of the final mean return, the MMER, the normalised MMER and the wall time per seed; failed seeds are counted
    apart (``seeds_failed``), never scored."""
    rows = []
    for (env_id, label, _), group in group_records(records).items():
        done = [r for r in group if r["status"] == FINISHED]
        row: Dict[str, Any] = dict(
            env_id=env_id,
            label=label,
            policy=group[0]["spec"]["policy"],
            algo=group[0]["spec"]["algo"],
            timesteps=group[0]["spec"]["timesteps"],
            seeds=sorted(r["spec"]["seed"] for r in group),
            seeds_finished=len(done),
            seeds_failed=sum(r["status"] == FAILED for r in group),
            seeds_total=len(group),
            n_parameters=group[0].get("n_parameters"),
        )
        if done:
            for key in ("final_mean_return", "mmer", "mmer_normalised", "wall_time_s"):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in done])
            successes = [final_success(r) for r in done]
            if None not in successes:
                row["final_success"], row["final_success_std"] = _mean_std(successes)
        rows.append(row)
    return rows


def _fmt(row: Dict[str, Any], key: str, digits: int = 3, unit: str = "") -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}{unit}"


def evaluation_schedule(records: List[Dict[str, Any]]) -> str:
    """When the runs were evaluated, read from their evaluation steps (evaluations wait for a rollout boundary,
    so the real interval is a multiple of the rollout size, not ``--eval-freq`` itself).

    :param records: run records with the same evaluation settings
    :return: e.g. ``"at step 0, every 1,024 steps and at the end"``
    """
    intervals = set()
    for record in records:
        steps = record["evaluations"]["timesteps"]
        if record["status"] == FINISHED:
            steps = steps[:-1]  # the evaluation at the end is off the schedule
        intervals.update(int(b - a) for a, b in zip(steps, steps[1:]))
    eval_freq = records[0]["spec"]["eval_freq"]
    if not intervals:
        return f"at step 0, at the first rollout boundary after every {eval_freq:,} steps and at the end"
    low, high = min(intervals), max(intervals)
    every = f"every {low:,} steps" if low == high else f"every {low:,} to {high:,} steps"
    if intervals != {eval_freq}:
        every += f" (--eval-freq {eval_freq:,}, rounded up to rollout boundaries)"
    return f"at step 0, {every} and at the end"


def verdict(lead: float, tie: float = TIE) -> str:
    """"ahead", "tie" or "behind": a lead (one mean minus the other's) of at most ``tie`` either way is a tie."""
    return "tie" if abs(lead) <= tie else ("ahead" if lead > 0 else "behind")


def against_reference(row: Dict[str, Any], reference: Dict[str, Any], tie: float = TIE) -> Optional[Dict[str, Any]]:
    """How a summary row scores against the reference policy's row of the same env and settings.

    :param row: a :func:`summarize` row
    :param reference: the reference policy's row
    :param tie: normalised MMER means this close are a tie
    :return: ``lead`` (difference of the normalised MMER means), ``verdict`` ("ahead", "tie" or "behind") and
        ``beyond_2_std`` (behind by more than twice the pooled std of the two rows, sqrt((std1^2 + std2^2) / 2));
        None if either row has no finished seed
    """
    if "mmer_normalised" not in row or "mmer_normalised" not in reference:
        return None
    lead = row["mmer_normalised"] - reference["mmer_normalised"]
    pooled_std = float(np.sqrt((row["mmer_normalised_std"] ** 2 + reference["mmer_normalised_std"] ** 2) / 2))
    scored = verdict(lead, tie)
    return dict(lead=lead, verdict=scored, beyond_2_std=scored == "behind" and -lead > 2 * pooled_std)


def _section_settings(spec: Dict[str, Any]) -> str:
    """The settings a table section states (runs that differ in them go to separate sections)."""
    keys = ("timesteps", "n_envs", "eval_freq", "eval_episodes", "deterministic_eval", "env_kwargs", "wrappers")
    return json.dumps([spec.get(key) for key in keys] + [spec.get("ppo_kwargs", {}).get("n_steps")], sort_keys=True)


def write_table(records: List[Dict[str, Any]], path: Path, reference: Optional[str] = None, tie: float = TIE) -> str:
    """Markdown table of the :func:`summarize` rows of ``records``, one section per env and settings.

    :param records: the run records
    :param path: where to write it
    :param reference: a policy label: a column says whether each other policy is ahead of it, tied or behind
        (:func:`against_reference`), and a list ends the tables with the count per policy
    :param tie: normalised MMER means this close are a tie
    :return: the markdown
    """
    lines = [
        "# Policy comparison",
        "",
        "Mean ± std (population std, over the finished seeds) of: the final mean evaluation return; the MMER, the "
        "maximum over evaluation points of the mean evaluation return; POPGym's normalised score 0.5 * MMER + 0.5 "
        "(meaningful for returns in [-1, 1]); the final success rate, for envs that report `is_success`; and the wall "
        "time of one seed's run (training and evaluations). Failed runs are counted in the seeds column, left out of "
        "the scores and curves, and listed at the end.",
    ]
    if reference is not None:
        lines[-1] += (
            f" Against {reference}: the lead of the normalised MMER mean; means within {tie} are a tie; \"beyond 2 "
            "std\" marks a loss by more than twice the pooled std of the two rows."
        )
    tally: Dict[str, List[Dict[str, Any]]] = {}
    sections: Dict[Tuple[str, str], List[Tuple[Dict[str, Any], List[Dict[str, Any]]]]] = {}
    for row, group in zip(summarize(records), group_records(records).values()):
        sections.setdefault((row["env_id"], _section_settings(group[0]["spec"])), []).append((row, group))
    for (env_id, _), section in sections.items():
        section_records = [record for _, group in section for record in group]
        spec = section_records[0]["spec"]
        mode = "deterministic" if spec["deterministic_eval"] else "stochastic"
        lines += [
            "",
            f"## {env_id}",
            "",
            f"{spec['timesteps']:,} env steps per run, {spec['n_envs']} envs; {spec['eval_episodes']} {mode} "
            f"evaluation episodes {evaluation_schedule(section_records)}. "
            f"Env kwargs: {json.dumps(spec['env_kwargs'])}; "
            f"wrappers: {', '.join(str(w) for w in spec['wrappers']) or 'none'}.",
            "",
            "| policy | algorithm | parameters | seeds | final return | MMER | normalised MMER | final success | "
            "wall time / seed |" + (f" against {reference} |" if reference is not None else ""),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if reference is not None else ""),
        ]
        reference_row = next((row for row, _ in section if row["label"] == reference), None)
        for row, _ in section:
            name = row["label"] if row["label"] == row["policy"] else f"{row['label']} ({row['policy']})"
            parameters = f"{row['n_parameters']:,}" if row["n_parameters"] else "-"
            seeds = f"{row['seeds_finished']}/{row['seeds_total']}"
            if row["seeds_failed"]:
                seeds += f" ({row['seeds_failed']} failed)"
            lines.append(
                f"| {name} | {row['algo']} | {parameters} | {seeds} | "
                f"{_fmt(row, 'final_mean_return')} | {_fmt(row, 'mmer')} | {_fmt(row, 'mmer_normalised')} | "
                f"{_fmt(row, 'final_success', 2)} | {_fmt(row, 'wall_time_s', 1, ' s')} |"
                + (f" {_against_cell(row, reference_row, tie, tally)} |" if reference is not None else "")
            )
    if reference is not None:
        lines += ["", f"## Against {reference}", ""]
        lines += [f"- {label}: ahead on {_count(outcomes, 'ahead')}, tied on {_count(outcomes, 'tie')}, behind on "
                  f"{_count(outcomes, 'behind')} (beyond 2 std on {sum(o['beyond_2_std'] for o in outcomes)}) of "
                  f"{len(outcomes)} env(s)" for label, outcomes in tally.items()]
        if not tally:
            lines.append(f"No env has finished runs of {reference} and of another policy.")
    lines += ["", "## Provenance", "", "The invocations that ran (or last resumed) the runs, with the code's commit and "
              "the date of each run's last session:", ""]
    provenance: Dict[Tuple[str, str, str], int] = {}
    for record in records:
        if not record.get("sessions"):  # prepared, never started
            continue
        versions, command = record.get("versions") or {}, record.get("options", {}).get("command", "not recorded")
        key = (command, versions.get("code_commit", "not recorded"), versions.get("date", "not recorded"))
        provenance[key] = provenance.get(key, 0) + 1
    for (command, commit, day), count in sorted(provenance.items(), key=lambda item: item[0][2]):
        lines.append(f"- `{command}`: commit {commit}, {day} ({count} run{'s' if count > 1 else ''})")
    failed = [record for record in records if record["status"] == FAILED]
    if failed:
        lines += ["", "## Failed runs", "", "Left out of the scores and curves; their logs say why (a later invocation "
                  "with the same settings runs them again):", ""]
        for record in failed:
            log = RunPaths(Path(), record["spec"]).log
            lines.append(f"- {run_name(record['spec'])}: {last_error_line(record) or 'no error recorded'} ({log})")
    text = "\n".join(lines) + "\n"
    write_text_atomically(path, text)
    return text


def _against_cell(row: Dict[str, Any], reference_row: Optional[Dict[str, Any]], tie: float,
                  tally: Dict[str, List[Dict[str, Any]]]) -> str:
    """The table's cell of ``row`` against the reference (and the outcome added to ``tally``, by label)."""
    if reference_row is None or row is reference_row:
        return "-"
    outcome = against_reference(row, reference_row, tie)
    if outcome is None:
        return "-"
    tally.setdefault(row["label"], []).append(outcome)
    return f"{outcome['verdict']} ({outcome['lead']:+.3f})" + (", beyond 2 std" if outcome["beyond_2_std"] else "")


def _count(outcomes: List[Dict[str, Any]], scored: str) -> int:
    return sum(outcome["verdict"] == scored for outcome in outcomes)


def write_report(out: Path, reference: Optional[str] = None, tie: float = TIE) -> Optional[str]:
    """Table (``results.md``), summary (``summary.json``) and curves (``learning_curves.png``; where the envs report
    ``is_success``, ``success_curves.png``) in ``out``, of every
    run record there (this invocation's and earlier ones'), so that a run on a subset never drops the others.

    :param out: output folder of the comparison
    :param reference: a policy label the others are scored against (:func:`write_table`)
    :param tie: normalised MMER means this close are a tie
    :return: the table, or None if there is no run record
    """
    records = []
    for path in record_paths_in(out):
        try:
            records.append(read_record(path))
        except ValueError as error:
            print(f"left out of the report: {error}", file=sys.stderr)
    if not records:
        return None
    if reference is not None and reference not in {record["spec"]["label"] for record in records}:
        labels = sorted({record["spec"]["label"] for record in records})
        raise ValueError(f"--reference {reference}: no run of that policy label in {out}; the labels there: {labels}")
    text = write_table(records, out / "results.md", reference, tie)
    write_json_atomically(out / "summary.json", summarize(records))
    if importlib.util.find_spec("matplotlib") is not None:
        plot_curves(records, out / "learning_curves.png")
        if any(None not in r["evaluations"].get("success_rate", [None]) for r in records):
            plot_curves(records, out / "success_curves.png", metric="success_rate")
    else:
        print("matplotlib is not installed: no learning-curve plot (pip install 'sb3-elmur[extra]')", file=sys.stderr)
    return text
