"""
A private CPU Vulkan driver (Mesa's lavapipe) for SAPIEN / ManiSkill 3 on machines without a GPU.

Every ManiSkill 3 env needs a Vulkan device that SAPIEN accepts, even with state observations.
Debian 12's own lavapipe (Mesa 22.3) is rejected; the Mesa 25 one of ``bookworm-backports`` works.
:func:`install` downloads it with the machine's own ``apt-get`` (private apt state, the mirror taken
from the machine's apt sources) and unpacks it into a folder of its own, so the system is left as it is.
:func:`activate` makes that driver the one the Vulkan loader uses in the current process.

Command line::

    python -m sb3_elmur.envs.vulkan install [--dir DIR]
    python -m sb3_elmur.envs.vulkan check [--dir DIR]

Modules: ``apt`` (apt with a private state), ``elf`` (reading shared libraries), ``installer`` (the install folder,
:func:`install`), ``activation`` (:func:`activate`, :func:`check`).

Only the standard library is imported by this package, so ``activate()`` can run before SAPIEN is imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from sb3_elmur.envs.vulkan.activation import activate, check
from sb3_elmur.envs.vulkan.apt import MIN_MESA_VERSION
from sb3_elmur.envs.vulkan.installer import DEFAULT_DIR, DIR_ENV_VAR, PathLike, default_dir, install, is_installed

__all__ = [
    "DEFAULT_DIR", "DIR_ENV_VAR", "MIN_MESA_VERSION", "PathLike", "activate", "check", "default_dir", "install",
    "is_installed", "main",
]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sb3_elmur.envs.vulkan", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("install", "check"))
    parser.add_argument("--dir", default=None, help=f"install folder (default: ${DIR_ENV_VAR} or {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            print(install(args.dir, verbose=True))
        except RuntimeError as e:
            print(f"install failed: {e}", file=sys.stderr)
            return 1
        return 0
    reason = check(args.dir)
    if reason is not None:
        print(reason)
        return 1
    print("OK")
    return 0
