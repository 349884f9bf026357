"""Module paths of sb3-elmur 0.1, before the package took its ``common/``, ``ppo/``, ``bc/`` layout.

Saved models name the classes they were built with by module path (a 0.1 zip names
``sb3_elmur.policies.ElmurPolicy`` and ``sb3_elmur.model.ElmurConfig``), and user code imports from these
paths: each old module is registered as an alias module that holds the same objects, so both keep working.
New code imports from the new paths.

=========================  ===============================================================================
old module                 where its names live now
=========================  ===============================================================================
``sb3_elmur.model``        ``common.config``, ``common.memory``, ``common.layers``, ``common.model``,
                           ``common.checks`` (the argument checks)
``sb3_elmur.policies``     ``common.policies``, ``common.backbone`` (packed state), ``common.actor``
``sb3_elmur.buffers``      ``ppo.buffers``
``sb3_elmur.callbacks``    ``common.callbacks``
``sb3_elmur.evaluation``   ``common.evaluation``; the T-Maze corridor evaluation: ``tmaze_eval.evaluation``
``sb3_elmur.utils``        ``common.utils``, ``common.checks`` (``check_device``)
``sb3_elmur.presets``      ``common.presets``
``sb3_elmur.wrappers``     ``envs.popgym``
``sb3_elmur.ppo``          a package now: ``sb3_elmur.ppo.ElmurPPO`` as before
``sb3_elmur.bc``           a package now: ``sb3_elmur.bc.RecurrentBC`` as before
``sb3_elmur.datasets``     the command; its library: ``bc.datasets``, ``bc.minari``, ``bc.collect``
=========================  ===============================================================================
"""

import importlib
import sys
import types
from typing import Dict, Tuple

OLD_MODULES: Dict[str, Tuple[str, ...]] = {
    "model": ("common.checks", "common.config", "common.memory", "common.layers", "common.model"),
    "policies": ("common.backbone", "common.policies", "common.actor"),
    "buffers": ("ppo.buffers",),
    "callbacks": ("common.callbacks",),
    "evaluation": ("tmaze_eval.evaluation", "common.evaluation"),
    "utils": ("common.checks", "common.utils"),
    "presets": ("common.presets",),
    "wrappers": ("envs.popgym",),
}


def register_old_modules() -> None:
    """Register ``sb3_elmur.<old>`` for every old module of :data:`OLD_MODULES` (later modules win a name)."""
    for old, new_modules in OLD_MODULES.items():
        alias = types.ModuleType(f"sb3_elmur.{old}", f"Old path (sb3-elmur 0.1) of {', '.join(new_modules)}.")
        for new in new_modules:
            module = importlib.import_module(f"sb3_elmur.{new}")
            alias.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        sys.modules[alias.__name__] = alias
        setattr(sys.modules["sb3_elmur"], old, alias)
