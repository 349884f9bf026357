"""Create Minari datasets for offline training (``python -m sb3_elmur.datasets``).

    python -m sb3_elmur.datasets tmaze --dataset-id tmaze/oracle-v0
    python -m sb3_elmur.datasets collect --algo RecurrentPPO --model model.zip --env CartPole-v1 \\
        --episodes 100 --dataset-id cartpole/ppo-v0

The package does not import this module, so ``-m`` runs it without runpy's double-import warning. The dataset id
(well formed, free or ``--overwrite``), the model and the env (the model's spaces against the env's) are checked
before any episode is collected. ``collect`` runs torch on one thread: it acts one step of one env at a time.
"""

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import gymnasium as gym
import torch

from sb3_elmur.bc.collect import collect_episodes, make_tmaze_dataset
from sb3_elmur.bc.datasets import EpisodeDataset
from sb3_elmur.bc.minari import check_minari_id
from sb3_elmur.common.evaluation import check_model_spaces
from sb3_elmur.common.utils import positive_int_argument

PROG = "python -m sb3_elmur.datasets"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Create Minari datasets for offline training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{tmaze,collect}")
    tmaze = sub.add_parser("tmaze", help="T-Maze oracle demonstrations (reference protocol)")
    collect = sub.add_parser("collect", help="episodes of a saved SB3 model on a gymnasium env")
    default = " (default: %(default)s)"
    for command in (tmaze, collect):
        command.add_argument("--dataset-id", required=True, help="Minari id to write, (namespace/)name-vN: tmaze/oracle-v0")
        command.add_argument("--overwrite", action="store_true", help="replace a dataset with this id (default: refuse)")
        command.add_argument("--seed", type=int, default=0, help="random seed" + default)
    tmaze.add_argument("--episodes", type=positive_int_argument, default=2000, help="number of episodes" + default)
    tmaze.add_argument("--max-corridor", type=positive_int_argument, default=28,
                       help="corridor lengths are drawn in 1..max" + default)
    collect.add_argument("--algo", default="RecurrentPPO", help="class in sb3_elmur, sb3_contrib, stable_baselines3" + default)
    collect.add_argument("--model", required=True, help="path of the saved model (.zip)")
    collect.add_argument("--env", required=True, help="gymnasium env id")
    collect.add_argument("--env-kwargs", default="{}", help="JSON dict of env keyword arguments" + default)
    collect.add_argument("--episodes", type=positive_int_argument, default=100, help="number of episodes" + default)
    collect.add_argument("--stochastic", action="store_true", help="sample actions, not the greedy ones (default: greedy)")
    return parser


def _write(
    parser: argparse.ArgumentParser, dataset: EpisodeDataset, args: argparse.Namespace, env: gym.Env, algorithm: str
) -> None:
    """Write ``dataset`` as ``args.dataset_id``, or exit with the error (no traceback) if it cannot be: another run
    wrote or is writing the id meanwhile, or the episodes do not fit the env's spaces.

    :param parser: the command's parser (for the error)
    :param dataset: the episodes
    :param args: the parsed command line
    :param env: the env the episodes come from
    :param algorithm: the dataset's ``algorithm_name``
    """
    try:
        dataset.to_minari(args.dataset_id, env=env, overwrite=args.overwrite, algorithm_name=algorithm)
    except (FileExistsError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}; nothing was written\n")


def main(argv: Optional[Sequence[str]] = None) -> EpisodeDataset:
    """Run the command line; return the dataset written."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        path = check_minari_id(args.dataset_id, args.overwrite)
    except (ImportError, ValueError, FileExistsError) as error:
        parser.error(str(error))

    if args.command == "tmaze":
        dataset = make_tmaze_dataset(args.episodes, max_corridor=args.max_corridor, seed=args.seed)
        env = gym.make("sb3_elmur/TMaze-v0")
        _write(parser, dataset, args, env, "T-Maze oracle")
    else:
        from sb3_elmur.common.utils import algorithm_class, load_algorithm

        try:
            env_kwargs = json.loads(args.env_kwargs)
        except json.JSONDecodeError as error:
            parser.error(f"--env-kwargs is not valid JSON ({error}): {args.env_kwargs!r}")
        if not isinstance(env_kwargs, dict):
            parser.error(f"--env-kwargs must be a JSON dict, got {args.env_kwargs!r}")
        try:
            algorithm_class(args.algo)
        except ValueError as error:
            parser.error(str(error))
        if not Path(args.model).is_file() and not Path(f"{args.model}.zip").is_file():
            parser.error(f"--model {args.model}: no such file")
        # One step of one env at a time: more threads only slow a small model down (and ElmurPolicy would warn
        # about them), and this command has no option to set them.
        torch.set_num_threads(1)
        env = gym.make(args.env, **env_kwargs)
        try:
            model = load_algorithm(args.algo, args.model)
        except ValueError as error:  # a zip of another algorithm, or a damaged one: the message says what to do
            parser.error(str(error))
        try:
            check_model_spaces(model, env.observation_space, env.action_space, f"the env {args.env}")
        except ValueError as error:
            parser.error(f"--model {args.model}: {error}")
        dataset = collect_episodes(model, env, args.episodes, deterministic=not args.stochastic, seed=args.seed)
        _write(parser, dataset, args, env, args.algo)
    print(f"wrote {args.dataset_id} to {path}: {len(dataset)} episodes, {dataset.n_steps} steps")
    return dataset


if __name__ == "__main__":
    main()
