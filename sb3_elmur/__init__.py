"""sb3-elmur: the ELMUR memory transformer as Stable-Baselines3 policies.

Importing the package registers ``ElmurPolicy``, ``CnnElmurPolicy`` and ``MultiInputElmurPolicy`` as
policy names of sb3-contrib's ``RecurrentPPO``, and the T-Maze environments under ``sb3_elmur/``.
"""

from sb3_contrib import RecurrentPPO

from sb3_elmur.bc import NonFiniteLossError, RecurrentBC
from sb3_elmur.envs import register_envs
from sb3_elmur.model import ElmurConfig, ElmurModel, ElmurState, InsufficientMemoryError
from sb3_elmur.ppo import ElmurPPO
from sb3_elmur.policies import (
    CnnElmurPolicy,
    ElmurPolicy,
    MultiInputElmurPolicy,
    NonFiniteError,
    RecurrentStateError,
)

__version__ = "0.1.0"

RecurrentPPO.policy_aliases.update(
    ElmurPolicy=ElmurPolicy, CnnElmurPolicy=CnnElmurPolicy, MultiInputElmurPolicy=MultiInputElmurPolicy
)
register_envs()

__all__ = [
    "CnnElmurPolicy",
    "ElmurConfig",
    "ElmurModel",
    "ElmurPPO",
    "ElmurPolicy",
    "ElmurState",
    "InsufficientMemoryError",
    "MultiInputElmurPolicy",
    "NonFiniteError",
    "NonFiniteLossError",
    "RecurrentBC",
    "RecurrentStateError",
    "__version__",
]
