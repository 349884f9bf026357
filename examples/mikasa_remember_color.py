"""Train ELMUR on MIKASA-Robo's RememberColor3: see a cube's colour, wait, then reach the cube of that colour.

    python examples/mikasa_remember_color.py                                # CPU: state observations, cue hidden
    python examples/mikasa_remember_color.py --obs-mode rgb+joints --image-size 64 --timesteps 20000

``memory_state`` (the default, fast on CPU) gives the robot's joints and each cube's position and visibility: the
target cube alone for 5 steps, nothing for 5, then all cubes, so the colour must be remembered. ``rgb+joints`` is
the suite's own memory setting (both cameras and the joints, the oracle removed). With a CUDA device the tasks run
GPU-simulated (ManiSkill's batched simulator) and ElmurPPO keeps the observations on the GPU; without one, each env
is a CPU-simulated worker process. Needs ``pip install -e '.[maniskill]'``, ``pip install --no-deps
mikasa-robo-suite==1.0.0`` and, without a GPU, ``python -m sb3_elmur.envs.vulkan install``.
"""

import argparse

import numpy as np
import torch

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs.maniskill import ManiSkillVecEnv


def main() -> None:
    parser = argparse.ArgumentParser(prog="python examples/mikasa_remember_color.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="RememberColor3-v0", help="MIKASA-Robo task id.")
    parser.add_argument("--obs-mode", default="memory_state", choices=["memory_state", "rgb+joints"],
                        help="Observations (see ManiSkillVecEnv).")
    parser.add_argument("--image-size", type=int, default=64, help="Camera resolution (rgb+joints).")
    parser.add_argument("--n-envs", type=int, default=None, help="Envs (default: 4 on CPU, 256 on a GPU).")
    parser.add_argument("--timesteps", type=int, default=100_000, help="Env steps of training.")
    parser.add_argument("--eval-episodes", type=int, default=20, help="Greedy evaluation episodes at the end.")
    parser.add_argument("--save", default="elmur_remember_color", help="Path of the saved model.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    gpu = torch.cuda.is_available()
    n_envs = args.n_envs or (256 if gpu else 4)
    env = ManiSkillVecEnv(args.task, n_envs=n_envs, obs_mode=args.obs_mode, image_size=args.image_size, seed=0,
                          device_observations=gpu)
    policy = "MultiInputElmurPolicy" if args.obs_mode == "rgb+joints" else "ElmurPolicy"
    # 60-step episodes in segments of 10: 8 slots per layer hold every segment of an episode
    model = ElmurPPO(policy, env, n_steps=60 if gpu else 120, batch_size=960 if gpu else 240, n_epochs=4,
                     sequence_length=30, memory_horizon=30, ent_coef=0.01, seed=0, verbose=0,
                     device="cuda" if gpu else "cpu",
                     policy_kwargs=dict(d_model=64, n_layers=2, memory_size=8, context_length=10))
    model.learn(args.timesteps, progress_bar=True)
    model.save(args.save)

    # Greedy evaluation: the success rate over finished episodes; predict takes numpy arrays, as SB3's does
    env.device_observations = False
    obs, state, successes = env.reset(), None, []
    starts = np.ones(env.num_envs, dtype=bool)
    while len(successes) < args.eval_episodes:
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        obs, _, starts, infos = env.step(actions)
        successes += [info["is_success"] for info in infos if "is_success" in info]
    env.close()
    print(f"{args.task} ({args.obs_mode}): success {np.mean(successes):.2f} over {len(successes)} episodes after "
          f"{model.num_timesteps:,} env steps; model saved to {args.save}.zip")


if __name__ == "__main__":
    main()
