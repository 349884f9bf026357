"""sb3-elmur: the ELMUR memory transformer as Stable-Baselines3 policies.

Importing the package registers ``ElmurPolicy``, ``CnnElmurPolicy`` and ``MultiInputElmurPolicy`` as
policy names of sb3-contrib's ``RecurrentPPO``, and the T-Maze and noisy recall environments under ``sb3_elmur/``.

Layout: ``common/`` (the model in plain PyTorch, the policies, evaluation, callbacks), ``ppo/`` (ElmurPPO and its
buffer), ``bc/`` (RecurrentBC and its datasets), ``envs/`` (T-Maze, noisy recall, POPGym, ManiSkill); the commands
``compare``, ``datasets``, ``tmaze_eval`` and ``zoo`` (``python -m sb3_elmur.<command>``).
"""

from sb3_contrib import RecurrentPPO

from sb3_elmur import _compat
from sb3_elmur.bc import NonFiniteLossError, RecurrentBC
from sb3_elmur.common.checks import InsufficientMemoryError
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.model import ElmurModel
from sb3_elmur.common.policies import (
    CnnElmurPolicy,
    ElmurPolicy,
    MultiInputElmurPolicy,
    NonFiniteError,
    RecurrentStateError,
)
from sb3_elmur.envs import register_envs
from sb3_elmur.ppo import ElmurPPO

__version__ = "0.1.0"

RecurrentPPO.policy_aliases.update(
    ElmurPolicy=ElmurPolicy, CnnElmurPolicy=CnnElmurPolicy, MultiInputElmurPolicy=MultiInputElmurPolicy
)
register_envs()
_compat.register_old_modules()

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
