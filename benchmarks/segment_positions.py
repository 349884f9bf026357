"""Where in its segment does a trained ELMUR agent err? Greedy per-step success by position in the segment.

    python benchmarks/segment_positions.py MODEL.zip --env popgym-RepeatPreviousEasy-v0 \
        --out benchmarks/results/segment_positions.md

For tasks that reward every step (POPGym's RepeatPrevious, Autoencode's recall phase, ...), a step counts as right
when its reward is positive. ELMUR's segments are disjoint: at position p of a segment a token sees the p earlier
steps of its segment and, before them, only the memory. A task that asks for the observation of j steps ago is
answered by self-attention at positions >= j and through the memory at positions < j; this report shows which.
"""

import argparse
from datetime import date
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_elmur  # noqa: F401
from sb3_elmur.common.utils import (
    code_commit,
    load_algorithm,
    new_report_path,
    write_text_atomically,
)
from sb3_elmur.envs.popgym import is_popgym_id, make_popgym_env


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/segment_positions.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="Saved model (zip) with an ELMUR policy.")
    parser.add_argument("--algo", default="ElmurPPO", help="Algorithm class that saved it.")
    parser.add_argument("--env", required=True, help="Env id (POPGym ids get the comparison's wrappers).")
    parser.add_argument("--episodes", type=int, default=80, help="Greedy evaluation episodes.")
    parser.add_argument("--n-envs", type=int, default=8, help="Envs run side by side.")
    parser.add_argument("--out", default="benchmarks/results/segment_positions.md", help="Markdown report to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    if is_popgym_id(args.env):
        env = DummyVecEnv([lambda: make_popgym_env(args.env)] * args.n_envs)
    else:
        import gymnasium as gym

        env = DummyVecEnv([lambda: gym.make(args.env)] * args.n_envs)
    model = load_algorithm(args.algo, args.model, env=env, device="cpu")
    config = getattr(model.policy, "elmur_config", None)
    if config is None:
        parser.error(f"{args.model} holds no ELMUR policy ({type(model.policy).__name__}): nothing to cut into segments")
    k = config.context_length

    # [position], and the same after the episode's first segment (where every position has steps before it).
    right_by_position, count_by_position = np.zeros((2, k)), np.zeros((2, k))
    right_by_step: Dict[int, List[bool]] = {}
    obs, state = env.reset(), None
    starts, steps, finished = np.ones(args.n_envs, dtype=bool), np.zeros(args.n_envs, dtype=int), 0
    while finished < args.episodes:
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        obs, rewards, starts, _ = env.step(actions)
        for i, step in enumerate(steps):
            for row in range(2 if step >= k else 1):
                right_by_position[row, step % k] += rewards[i] > 0
                count_by_position[row, step % k] += 1
            right_by_step.setdefault(int(step), []).append(bool(rewards[i] > 0))
        steps = np.where(starts, 0, steps + 1)
        finished += int(starts.sum())
    env.close()

    by_position = (right_by_position / np.maximum(count_by_position, 1)).tolist()
    n_first = min(2 * k, len(right_by_step))
    first_steps: Dict[int, float] = {step: float(np.mean(right_by_step[step])) for step in range(n_first)}
    lines: List[str] = [
        f"# Greedy per-step success by position in the segment: {args.env}",
        "",
        f"Command: `python benchmarks/segment_positions.py {args.model} --algo {args.algo} --env {args.env} --episodes "
        f"{args.episodes} --n-envs {args.n_envs} --out {args.out}` (code {code_commit(Path(__file__).parent)}, "
        f"{date.today().isoformat()}). A step is right when its reward is positive; "
        f"{finished} episodes, segments of {k} steps.",
        "",
        "| position in segment | " + " | ".join(str(p) for p in range(k)) + " |",
        "|---|" + "---:|" * k,
        "| right, all segments | " + " | ".join(f"{value:.2f}" for value in by_position[0]) + " |",
        "| right, after the first | " + " | ".join(f"{value:.2f}" for value in by_position[1]) + " |",
        "",
        f"By episode step (the first {len(first_steps)}):",
        "",
        "| episode step | " + " | ".join(str(s) for s in first_steps) + " |",
        "|---|" + "---:|" * len(first_steps),
        "| right | " + " | ".join(f"{value:.2f}" for value in first_steps.values()) + " |",
    ]
    write_text_atomically(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
