"""The ``python -m sb3_elmur.datasets`` command (``__main__``): make, collect and convert episode datasets.

The library it runs lives in :mod:`sb3_elmur.bc` (``datasets``, ``minari``, ``collect``); its names are also
importable from here, where they lived before sb3-elmur 0.2.
"""

from sb3_elmur.bc.collect import collect_episodes, make_recall_dataset, make_tmaze_dataset
from sb3_elmur.bc.datasets import Episode, EpisodeDataset, Windows, map_observations, n_rows
from sb3_elmur.bc.minari import STAGING_PREFIX, check_minari_id

__all__ = [
    "Episode", "EpisodeDataset", "STAGING_PREFIX", "Windows", "check_minari_id", "collect_episodes",
    "make_recall_dataset", "make_tmaze_dataset", "map_observations", "n_rows",
]
