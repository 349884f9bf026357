"""Learning curves of a comparison: mean ± std over seeds, one panel per env."""

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from sb3_elmur.common.utils import write_atomically
from sb3_elmur.compare.records import FAILED, group_records


def curve_label(label: str, n_seeds: int) -> str:
    """Legend entry of a learning curve: ``"ElmurPolicy (1 seed)"``, ``"ElmurPolicy (3 seeds)"``."""
    return f"{label} ({n_seeds} seed{'' if n_seeds == 1 else 's'})"


CURVES = {"mean_return": "mean evaluation return", "success_rate": "evaluation success rate"}


def plot_curves(records: List[Dict[str, Any]], path: Path, metric: str = "mean_return") -> None:
    """PNG of learning curves: one panel per env, mean ± std over seeds of ``metric`` (a key of :data:`CURVES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = list(dict.fromkeys(r["spec"]["env_id"] for r in records))
    n_cols = min(3, max(1, len(env_ids)))
    n_rows = math.ceil(len(env_ids) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.6 * n_rows), squeeze=False)
    groups = group_records(records)
    for ax, env_id in zip(axes.flat, env_ids):
        for (group_env_id, label, _), group in groups.items():
            # Failed runs are left out: a run that failed part-way would cut every seed's curve short.
            curves = [r["evaluations"] for r in group if r["evaluations"]["timesteps"] and r["status"] != FAILED]
            if group_env_id != env_id or not curves:
                continue
            # Seeds are averaged on the evaluation points they all reached.
            common = sorted(set.intersection(*(set(c["timesteps"]) for c in curves)))
            if not common:
                continue
            values = np.array([[dict(zip(c["timesteps"], c.get(metric, [])))[t] for t in common] for c in curves
                               if len(c.get(metric, [])) == len(c["timesteps"])], dtype=float)
            if len(values) < len(curves) or np.isnan(values).any():  # some seeds do not have it
                continue
            mean, std = values.mean(axis=0), values.std(axis=0)
            ax.plot(common, mean, label=curve_label(label, len(curves)))
            ax.fill_between(common, mean - std, mean + std, alpha=0.2)
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("env steps")
        ax.set_ylabel(CURVES[metric])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(env_ids) :]:
        ax.axis("off")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
