"""GPU-vectorized training on a MIKASA-Robo task: ElmurPPO (or the LSTM baseline) on ManiSkill's batched simulator.

On a CUDA machine (the paper-scale setting: 256 GPU-simulated envs, both cameras and the joints, 128 x 128):

    python benchmarks/maniskill_gpu.py --policy elmur
    python benchmarks/maniskill_gpu.py --policy lstm

Every chunk of training appends env steps/s (whole loop), the training success rate and mean return of the last 100
finished episodes to ``<out>/progress.json`` and ``progress.md``, and saves ``<out>/model.zip`` (written atomically);
a re-run with the same ``--out`` (default ``runs/maniskill_gpu/<policy>``, git-ignored) resumes from that model. The
summary to commit is ``progress.md`` and ``progress.json``, copied to ``benchmarks/results/maniskill_gpu/<policy>/``.
``--dry-run`` runs the same code on the CPU backend with 2 envs, 36 x 36 images and two chunks of one rollout, in a
few seconds (CI exercises it).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

import sb3_elmur  # noqa: F401  (registers the policy names)
from sb3_elmur import ElmurPPO
from sb3_elmur.envs.maniskill import ManiSkillVecEnv
from sb3_elmur.common.utils import write_atomically, write_json_atomically, write_text_atomically

# Per policy: algorithm settings beside the shared ones (60-step episodes; ELMUR keeps 8 segments of 10 in memory)
POLICIES: Dict[str, Dict[str, Any]] = {
    "elmur": dict(policy="MultiInputElmurPolicy", sequence_length=30, memory_horizon=30,
                  policy_kwargs=dict(d_model=128, n_layers=2, n_heads=4, memory_size=8, context_length=10)),
    "lstm": dict(policy="MultiInputLstmPolicy", policy_kwargs=dict(lstm_hidden_size=512)),  # MIKASA's LSTM agent
}


def build_model(args: argparse.Namespace, env: ManiSkillVecEnv, device: str) -> Any:
    from sb3_contrib import RecurrentPPO

    settings = dict(POLICIES[args.policy])
    policy = settings.pop("policy")
    # One rollout per env episode; minibatches of 8 rollouts' worth of whole sequences
    common = dict(n_steps=args.n_steps, batch_size=max(args.n_steps, args.n_envs * args.n_steps // 8), n_epochs=4,
                  learning_rate=3e-4, ent_coef=0.01, gamma=0.99, seed=args.seed, device=device, verbose=0)
    algorithm = ElmurPPO if args.policy == "elmur" else RecurrentPPO
    model_path = Path(args.out) / "model.zip"
    if model_path.exists():
        print(f"resuming from {model_path}", flush=True)
        return algorithm.load(model_path, env=env, device=device)
    return algorithm(policy, env, **common, **settings)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/maniskill_gpu.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="RememberColor3-v0", help="MIKASA-Robo (or ManiSkill) task id.")
    parser.add_argument("--policy", default="elmur", choices=sorted(POLICIES), help="ElmurPPO or the LSTM baseline.")
    parser.add_argument("--n-envs", type=int, default=256, help="GPU-simulated envs.")
    parser.add_argument("--image-size", type=int, default=128, help="Camera resolution.")
    parser.add_argument("--n-steps", type=int, default=60, help="Rollout steps per env (RememberColor: one episode).")
    parser.add_argument("--timesteps", type=int, default=None, help="Env steps of training (default: 10M; dry run: 2 "
                        "chunks).")
    parser.add_argument("--chunk", type=int, default=500_000, help="Env steps between progress records.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and the envs.")
    parser.add_argument("--out", default=None, help="Output folder (default: runs/maniskill_gpu/POLICY).")
    parser.add_argument("--dry-run", action="store_true", help="CPU backend, 2 envs, 36 x 36, two chunks of one rollout.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dry_run:
        args.n_envs, args.image_size, args.n_steps = 2, 36, 8
        args.chunk = args.n_envs * args.n_steps
        args.timesteps = args.timesteps or 2 * args.chunk
        sim_backend, device = "cpu", "cpu"
    elif not torch.cuda.is_available():
        parser.error("this run needs a CUDA device (GPU simulation); --dry-run checks it on the CPU")
    else:
        sim_backend, device = "gpu", "cuda"
    args.timesteps = args.timesteps or 10_000_000
    out = Path(args.out or f"runs/maniskill_gpu/{args.policy}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key) for key in ("task", "policy", "n_envs", "image_size", "n_steps", "seed")}
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:  # resume the same run only
        parser.error(f"{out} holds a run with other settings ({settings_path.read_text()}): use another --out")
    write_json_atomically(settings_path, settings)
    progress_path = out / "progress.json"
    progress: List[Dict[str, Any]] = json.loads(progress_path.read_text()) if progress_path.exists() else []

    env = ManiSkillVecEnv(args.task, n_envs=args.n_envs, obs_mode="rgb+joints", image_size=args.image_size,
                          sim_backend=sim_backend, device_observations=args.policy == "elmur" and sim_backend == "gpu",
                          seed=args.seed)
    model = build_model(args, env, device)
    header = ["| env steps | env steps/s | training success (last 100 episodes) | mean return |", "|---:|---:|---:|---:|"]
    print("\n".join(header), flush=True)
    while model.num_timesteps < args.timesteps:
        start, steps_before = time.perf_counter(), model.num_timesteps
        model.learn(args.chunk, reset_num_timesteps=False)
        elapsed = time.perf_counter() - start
        progress.append(dict(
            timesteps=int(model.num_timesteps),
            env_steps_per_s=(model.num_timesteps - steps_before) / elapsed,
            # SB3's window: the last 100 finished training episodes
            success_rate=float(np.mean(model.ep_success_buffer)) if model.ep_success_buffer else None,
            mean_return=float(np.mean([info["r"] for info in model.ep_info_buffer])) if model.ep_info_buffer else None,
        ))
        write_atomically(out / "model.zip", lambda tmp: model.save(tmp))
        write_json_atomically(progress_path, progress)
        rows = [f"| {p['timesteps']:,} | {p['env_steps_per_s']:.0f} | {p['success_rate']} | {p['mean_return']} |"
                for p in progress]
        write_text_atomically(out / "progress.md", "\n".join([
            f"# {args.task}: {args.policy}, {args.n_envs} {sim_backend}-simulated envs, RGB + joints "
            f"{args.image_size} x {args.image_size}", "",
            *header, *rows]) + "\n")
        print(rows[-1], flush=True)
    env.close()


if __name__ == "__main__":
    main()
