"""rl-zoo3's own ``train`` and ``enjoy`` command lines, with ElmurPPO as ``--algo elmur_ppo``.

rl-zoo3 fixes its ``--algo`` choices when it builds its parser, so ``--gym-packages`` cannot add an algorithm:
this entry point registers ``elmur_ppo`` in rl-zoo3's algorithm table, then runs rl-zoo3's unmodified command.

    python -m sb3_elmur.zoo train --algo elmur_ppo --env sb3_elmur/PassiveTMaze-v0 --gym-packages sb3_elmur \\
        -conf zoo_configs/elmur_ppo.yml --num-threads 1 -f logs
    python -m sb3_elmur.zoo enjoy --algo elmur_ppo --env sb3_elmur/PassiveTMaze-v0 --gym-packages sb3_elmur \\
        -f logs --exp-id 1 --no-render

Every other argument is rl-zoo3's (``python -m sb3_elmur.zoo train --help``).
"""

import importlib
import sys
from typing import Optional, Sequence

ALGO_NAME = "elmur_ppo"
COMMANDS = ("train", "enjoy")


def register() -> None:
    """Add ElmurPPO to rl-zoo3's algorithm table as ``elmur_ppo`` (what ``--algo`` accepts)."""
    from rl_zoo3.utils import ALGOS

    from sb3_elmur.ppo import ElmurPPO

    ALGOS[ALGO_NAME] = ElmurPPO


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m sb3_elmur.zoo {{{','.join(COMMANDS)}}} [rl-zoo3 arguments]\n"
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage + __doc__.split("\n\n")[0].replace("\n", " ") + "\n")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        sys.stderr.write(f"{usage}python -m sb3_elmur.zoo: error: unknown command {argv[0]!r} (choose from "
                         f"{', '.join(COMMANDS)})\n")
        raise SystemExit(2)
    try:
        command = importlib.import_module(f"rl_zoo3.{argv[0]}")
    except ImportError as error:
        sys.stderr.write(f"python -m sb3_elmur.zoo: error: rl-zoo3 is needed: pip install -e \".[zoo]\" ({error})\n")
        raise SystemExit(2) from error
    register()
    # rl-zoo3 parses sys.argv; its usage line then names this command.
    sys.argv = [f"python -m sb3_elmur.zoo {argv[0]}", *argv[1:]]
    getattr(command, argv[0])()


if __name__ == "__main__":
    main()
