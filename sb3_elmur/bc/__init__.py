"""RecurrentBC: behaviour cloning of recurrent policies (ELMUR or LSTM) from episode datasets, in memory or Minari."""

from sb3_elmur.bc.bc import NonFiniteLossError, RecurrentBC
from sb3_elmur.bc.datasets import Episode, EpisodeDataset

__all__ = ["Episode", "EpisodeDataset", "NonFiniteLossError", "RecurrentBC"]
