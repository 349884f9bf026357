"""The warnings RecurrentBC gives about its data, once each: what is wrong, what it costs, and what to do."""

import warnings
from typing import TYPE_CHECKING

from sb3_elmur.bc.datasets import Windows

if TYPE_CHECKING:
    from sb3_elmur.bc.bc import RecurrentBC

# A burn-in this many times longer than the window it serves is warned about (once): it runs the policy, without
# gradient, over that many steps for every step trained, and dominates the cost of a gradient step.
LONG_BURN_IN_RATIO = 100


def warn_if_no_evictions(model: "RecurrentBC") -> None:
    """Warn (once per dataset) when no training episode overwrites any ELMUR memory slot twice."""
    config = getattr(model.policy, "elmur_config", None)
    if config is None or model.dataset is None or getattr(model, "_eviction_checked", None) is model.dataset:
        return
    model._eviction_checked = model.dataset
    longest = max(len(episode) for episode in model.dataset.episodes)
    writes = longest // config.context_length  # one memory write per completed segment
    if writes > config.memory_size + 1:
        return
    warnings.warn(
        f"the longest training episode has {longest} steps: {writes} memory writes (segments of "
        f"{config.context_length} steps) into {config.memory_size} slots, so no slot is overwritten twice.\n"
        "Memory may then not keep a cue through evictions: on noisy recall such models fell to 0.36-0.71 (chance "
        "0.33) from 100 steps on (benchmarks/results/recall_offline_wait.md); train on episodes of more than "
        f"{(config.memory_size + 1) * config.context_length} steps to teach it.",
        UserWarning,
    )


def warn_if_long_burn_in(model: "RecurrentBC", windows: Windows, seconds: float) -> None:
    """Warn (once) when a window's burn-in runs the policy over :data:`LONG_BURN_IN_RATIO` times more steps than
    the window trains on: a 40,000-step episode made every gradient step take seconds, without a word."""
    if not model.burn_in or getattr(model, "_long_burn_in_warned", False) or model.dataset is None:
        return
    window = model.sections * model.context_length
    prefix = int(windows.prefix_segments.max()) * model.context_length
    if prefix < LONG_BURN_IN_RATIO * window:
        return
    model._long_burn_in_warned = True
    longest = max(len(episode) for episode in model.dataset.episodes)
    warnings.warn(
        f"RecurrentBC burn-in: the longest training episode has {longest:,} steps, and a window that starts late "
        f"in it is preceded by a burn-in through the steps before it (without gradient), up to {prefix:,} steps "
        f"here: {prefix // window:,}x the {window} steps (sections x context_length) the window trains on. This "
        f"gradient step's burn-in took {seconds:.1f} s (batch_size={model.batch_size}). To train faster: "
        "burn_in=False (windows start from an empty memory, as the reference code does: no cost, but a memory "
        "they never have when acting), shorter training episodes, or longer windows (sections, context_length).",
        UserWarning,
    )
