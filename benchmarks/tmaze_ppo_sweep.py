"""One RecurrentPPO (or ElmurPPO) run on the passive T-Maze with given PPO and policy settings, for tuning long corridors.

Trains in chunks of 25k env steps (8 envs); after each chunk prints the greedy success over 100 episodes
at the evaluation corridor, and the mean return and length of the last 100 training episodes.

    python benchmarks/tmaze_ppo_sweep.py ElmurPolicy 100 --timesteps 500000 \\
        --ppo-kwargs '{"n_steps": 512, "batch_size": 512, "ent_coef": 0.005}' --policy-kwargs '{"memory_size": 16}'

The corridor may be a range such as 1-100 (each training episode draws its length; evaluation at the longest).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.vec_env import VecMonitor

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common import presets
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.tmaze_eval.evaluation import evaluate_tmaze


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/tmaze_ppo_sweep.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("policy", choices=["ElmurPolicy", "MlpLstmPolicy"], help="Policy to train.")
    parser.add_argument("corridor", help="Training corridor length L, or a range LOW-HIGH.")
    parser.add_argument("--algo", default="RecurrentPPO", choices=["RecurrentPPO", "ElmurPPO"],
                        help="Algorithm (ElmurPPO: ElmurPolicy only; its sequence_length and memory_horizon go in "
                        "--ppo-kwargs).")
    parser.add_argument("--timesteps", type=int, default=500_000, help="Env-step budget of training.")
    parser.add_argument("--ppo-kwargs", default="{}", help="JSON merged over presets.TMAZE_PPO_KWARGS.")
    parser.add_argument("--policy-kwargs", default="{}", help="JSON merged over the policy's T-Maze preset.")
    parser.add_argument("--terminate-on-timeout", action="store_true", help="Time-outs end episodes as failures.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the env and the model.")
    parser.add_argument("--stop-at", type=float, default=None,
                        help="Stop once the greedy success reaches this value (None: train the whole budget).")
    parser.add_argument("--save", default=None, help="Path of the final model (None: not saved).")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    bounds = tuple(int(v) for v in args.corridor.split("-"))
    train_corridor = bounds if len(bounds) == 2 else bounds[0]
    eval_corridor = bounds[-1]
    ppo_kwargs = {**presets.TMAZE_PPO_KWARGS, **json.loads(args.ppo_kwargs)}
    preset = presets.TMAZE_POLICY_KWARGS if args.policy == "ElmurPolicy" else presets.TMAZE_LSTM_POLICY_KWARGS
    policy_kwargs = {**preset, **json.loads(args.policy_kwargs)}
    env = TMazeVecEnv(8, corridor_length=train_corridor, variant="passive", seed=args.seed,
                      terminate_on_timeout=args.terminate_on_timeout)
    env = VecMonitor(env)
    algorithm = ElmurPPO if args.algo == "ElmurPPO" else RecurrentPPO
    model = algorithm(args.policy, env, policy_kwargs=policy_kwargs, seed=args.seed, **ppo_kwargs)
    print(ppo_kwargs, policy_kwargs, flush=True)
    start = time.time()
    while model.num_timesteps < args.timesteps:
        model.learn(25_000, reset_num_timesteps=False)
        success = evaluate_tmaze(model, eval_corridor)
        returns = [info["r"] for info in model.ep_info_buffer]
        lengths = [info["l"] for info in model.ep_info_buffer]
        print(
            f"steps={model.num_timesteps} success={success:.2f} ep_r={sum(returns) / len(returns):.3f} "
            f"ep_len={sum(lengths) / len(lengths):.1f} t={time.time() - start:.0f}",
            flush=True,
        )
        if args.stop_at is not None and success >= args.stop_at:
            break
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.save)


if __name__ == "__main__":
    main()
