"""Train an ElmurPolicy briefly on the passive T-Maze, export it to ONNX, and replay the exported policy with the runner.

    python examples/export_tmaze.py                              # corridor 10: ~0.5-3 min on 2 CPU cores
    python examples/export_tmaze.py --out-dir runs/export_tmaze  # keep the model zip and the ONNX file

The replay runs through ``sb3_elmur/export/runner.py`` (numpy and onnxruntime; no torch in its own code), on gymnasium
T-Maze envs, and its success is printed beside the one ``predict`` reaches on the same corridor. The same on a
MIKASA-Robo task, with camera images: ``examples/export_mikasa.py``.
"""

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3.common.vec_env import VecMonitor

import sb3_elmur  # noqa: F401  (registers "ElmurPolicy" and the T-Maze ids)
from sb3_contrib import RecurrentPPO
from sb3_elmur.common.presets import TMAZE_POLICY_KWARGS, TMAZE_PPO_KWARGS
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.export import export_policy
from sb3_elmur.export.runner import OnnxPolicy, run_episodes
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze


def main() -> None:
    parser = argparse.ArgumentParser(prog="python examples/export_tmaze.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--corridor", type=int, default=10, help="Corridor length L.")
    parser.add_argument("--timesteps", type=int, default=200_000, help="Env-step budget of training.")
    parser.add_argument("--target", type=float, default=0.95, help="Stop training once greedy success reaches this.")
    parser.add_argument("--episodes", type=int, default=100, help="Episodes of the replay with the runner.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--out-dir", default=None, help="Folder to keep the model and the ONNX file in (None: a "
                        "temporary folder).")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    env = VecMonitor(TMazeVecEnv(8, corridor_length=args.corridor, variant="passive", seed=args.seed))
    model = RecurrentPPO("ElmurPolicy", env, policy_kwargs=TMAZE_POLICY_KWARGS, seed=args.seed, **TMAZE_PPO_KWARGS)
    success = 0.0
    while model.num_timesteps < args.timesteps and success < args.target:
        model.learn(8192, reset_num_timesteps=False)
        success = evaluate_tmaze(model, args.corridor, n_episodes=100)
        print(f"{model.num_timesteps:>7} env steps: greedy success {success:.2f} (predict)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "elmur_tmaze.zip")
        # What `python -m sb3_elmur.export elmur_tmaze.zip --format onnx --out elmur_tmaze.onnx` does.
        description = export_policy(folder / "elmur_tmaze.zip", folder / "elmur_tmaze.onnx", format="onnx",
                                    overwrite=True, check_steps=40)
        print(f"exported {folder / 'elmur_tmaze.onnx'}: largest difference from the torch step over 40 steps "
              f"{max(description['check'].values()):.1e}")
        # What `python sb3_elmur/export/runner.py elmur_tmaze.onnx --env sb3_elmur/PassiveTMaze-v0 ...` does.
        policy = OnnxPolicy(str(folder / "elmur_tmaze.onnx"), seed=args.seed)
        replay_env = gym.make("sb3_elmur/PassiveTMaze-v0", corridor_length=args.corridor)
        episodes = run_episodes(policy, replay_env, args.episodes, seed=args.seed)
    replay_success = sum(episode["is_success"] for episode in episodes) / len(episodes)
    print(f"corridor {args.corridor}: success {replay_success:.2f} over {len(episodes)} episodes (exported ONNX policy, "
          f"onnxruntime), {success:.2f} with predict")


if __name__ == "__main__":
    main()
