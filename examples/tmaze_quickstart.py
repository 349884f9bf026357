"""Train ElmurPolicy with sb3-contrib's stock RecurrentPPO (or ElmurPPO) on the passive T-Maze, evaluate, save
and reload.

    python examples/tmaze_quickstart.py                      # corridor 10, ~1-3 minutes on 2 CPU cores
    python examples/tmaze_quickstart.py --algo ElmurPPO      # the same with ELMUR's own algorithm
    (trains until 95 % greedy success or the budget, then saves, reloads and evaluates the reloaded model)
    python examples/tmaze_quickstart.py --corridor 30 --timesteps 300000 --tensorboard-log runs/
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from stable_baselines3.common.vec_env import VecMonitor

import sb3_elmur  # noqa: F401  (registers "ElmurPolicy" and the T-Maze ids)
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze
from sb3_elmur.common.presets import TMAZE_POLICY_KWARGS, TMAZE_PPO_KWARGS
from sb3_elmur.common.utils import algorithm_class


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python examples/tmaze_quickstart.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--algo", default="RecurrentPPO", choices=["RecurrentPPO", "ElmurPPO"],
                        help="Algorithm: sb3-contrib's RecurrentPPO, or ElmurPPO (ELMUR's own rollout buffer).")
    parser.add_argument("--corridor", type=int, default=10, help="Corridor length L.")
    parser.add_argument("--timesteps", type=int, default=200_000, help="Env-step budget of training.")
    parser.add_argument("--target", type=float, default=0.95, help="Stop once the greedy success rate reaches this.")
    parser.add_argument("--eval-every", type=int, default=8192, help="Env steps between two evaluations.")
    parser.add_argument("--n-envs", type=int, default=8, help="Parallel T-Maze envs.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument(
        "--eval-corridors", type=int, nargs="*", default=None,
        help="Corridors to evaluate the reloaded model at (None: the training corridor).",
    )
    parser.add_argument("--tensorboard-log", default=None, help="TensorBoard log folder (None: no logs).")
    parser.add_argument("--progress-bar", action="store_true", help="Show a progress bar while training.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    env = VecMonitor(TMazeVecEnv(args.n_envs, corridor_length=args.corridor, variant="passive", seed=args.seed))
    algorithm = algorithm_class(args.algo)
    model = algorithm(
        "ElmurPolicy",
        env,
        policy_kwargs=TMAZE_POLICY_KWARGS,
        tensorboard_log=args.tensorboard_log,
        seed=args.seed,
        verbose=0,
        **TMAZE_PPO_KWARGS,
    )
    start = time.perf_counter()
    success = 0.0
    while model.num_timesteps < args.timesteps and success < args.target:
        model.learn(args.eval_every, reset_num_timesteps=False, progress_bar=args.progress_bar)
        success = evaluate_tmaze(model, args.corridor, n_episodes=100)
        print(f"{model.num_timesteps:>7} env steps: success {success:.2f}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"trained {model.num_timesteps} env steps in {elapsed:.0f} s ({model.num_timesteps / elapsed:.0f} steps/s)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "elmur_tmaze"
        model.save(path)
        model = algorithm.load(path)
    for corridor in args.eval_corridors or [args.corridor]:
        success = evaluate_tmaze(model, corridor, n_episodes=100)
        print(f"corridor {corridor}: success {success:.2f} over 100 episodes (reloaded model, greedy actions)")


if __name__ == "__main__":
    main()
