"""Train ELMUR briefly on MIKASA-Robo's RememberColor3, export it to ONNX, and replay the exported policy with the runner.

    python examples/export_mikasa.py                                   # RGB + joints at 36 x 36: ~2 min on 2 CPU cores
    python examples/export_mikasa.py --timesteps 20000 --out-dir runs/export_mikasa   # keep the zip and the ONNX file

The point is the deployment path, not the score: a few thousand env steps do not teach the task (on CPU neither ELMUR
nor the LSTM learns it in 200k, ``benchmarks/README.md``). The camera images and the joints go into the exported
graph as they come from the env (SB3's image scaling is inside it). The replay steps the task with the runner's
:class:`~sb3_elmur.export.runner.OnnxPolicy` (numpy and onnxruntime in its own code) while ``predict`` acts on the
same observations, and prints the largest difference between their actions: the file is the policy, memory writes
included. The replay alone, as robot-side code runs it::

    python sb3_elmur/export/runner.py elmur_mikasa.onnx --env sb3_elmur:sb3_elmur/RememberColor3-v0 \\
        --env-kwargs '{"obs_mode": "rgb+joints", "image_size": 36}' --episodes 3

Needs ``pip install -e '.[maniskill,export]'``, ``pip install --no-deps mikasa-robo-suite==1.0.0`` and, without a GPU,
``python -m sb3_elmur.envs.vulkan install``.
"""

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import sb3_elmur  # noqa: F401  (registers the policy names and the sb3_elmur/<task> ids)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs.maniskill import ManiSkillVecEnv
from sb3_elmur.export import export_policy
from sb3_elmur.export.runner import OnnxPolicy


def replay(model: ElmurPPO, policy: OnnxPolicy, env: gym.Env, n_episodes: int, seed: int) -> dict:
    """Step ``env`` with the exported policy's actions while ``predict`` acts on the same observations.

    :return: the success rate, the episodes' mean length and the largest action difference from ``predict``
    """
    successes, lengths, largest = [], [], 0.0
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed + episode)
        policy.reset()
        state, start, done, length = None, np.ones(1, dtype=bool), False, 0
        while not done:
            batch = {key: value[None] for key, value in obs.items()}
            action, _ = policy.act(batch)
            expected, state = model.predict(batch, state=state, episode_start=start, deterministic=True)
            largest = max(largest, float(np.abs(action - expected).max()))
            obs, _, terminated, truncated, info = env.step(action[0])
            start, done, length = np.zeros(1, dtype=bool), terminated or truncated, length + 1
        successes.append(bool(info["is_success"]))
        lengths.append(length)
    return {"success": float(np.mean(successes)), "length": float(np.mean(lengths)), "largest_difference": largest}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python examples/export_mikasa.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="RememberColor3-v0", help="MIKASA-Robo task id.")
    parser.add_argument("--image-size", type=int, default=36, help="Camera resolution (36: the smallest SB3's CNN takes).")
    parser.add_argument("--n-envs", type=int, default=2, help="CPU-simulated envs of the training run.")
    parser.add_argument("--timesteps", type=int, default=2048, help="Env steps of training.")
    parser.add_argument("--episodes", type=int, default=2, help="Episodes of the replay.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of training; the replay's episodes use "
                        "seeds from 10,000 on, which training never saw.")
    parser.add_argument("--out-dir", default=None, help="Folder to keep the model and the ONNX file in (None: a "
                        "temporary folder).")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    env = ManiSkillVecEnv(args.task, n_envs=args.n_envs, obs_mode="rgb+joints", image_size=args.image_size,
                          seed=args.seed)
    model = ElmurPPO("MultiInputElmurPolicy", env, n_steps=64, batch_size=64 * args.n_envs, n_epochs=2,
                     seed=args.seed, policy_kwargs=dict(d_model=32, n_layers=1, memory_size=4, context_length=10))
    model.learn(args.timesteps)
    env.close()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "elmur_mikasa.zip")
        # What `python -m sb3_elmur.export elmur_mikasa.zip --format onnx --out elmur_mikasa.onnx` does.
        description = export_policy(folder / "elmur_mikasa.zip", folder / "elmur_mikasa.onnx", format="onnx",
                                    overwrite=True, check_steps=20)
        print(f"exported {folder / 'elmur_mikasa.onnx'} (inputs: "
              f"{', '.join(spec['name'] for spec in description['inputs'])}); largest difference from the torch step "
              f"over 20 steps {max(description['check'].values()):.1e}", flush=True)
        policy = OnnxPolicy(str(folder / "elmur_mikasa.onnx"), seed=args.seed)
        replay_env = gym.make(f"sb3_elmur/{args.task}", obs_mode="rgb+joints", image_size=args.image_size)
        result = replay(model, policy, replay_env, args.episodes, seed=10_000)
        replay_env.close()
    print(f"{args.task}: replayed {args.episodes} episodes ({result['length']:.0f} steps each on average) with the "
          f"exported policy after {model.num_timesteps:,} env steps of training: success {result['success']:.2f}; "
          f"largest action difference from predict {result['largest_difference']:.1e}")


if __name__ == "__main__":
    main()
