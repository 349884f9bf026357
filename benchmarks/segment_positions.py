"""Where in its segment does a trained ELMUR agent err? Greedy per-step success by position in the segment.

    python benchmarks/segment_positions.py MODEL.zip [MODEL.zip ...] --env popgym-RepeatPreviousEasy-v0 \
        --out benchmarks/results/segment_positions.md

Several models (one per seed) give a row each and their mean.

For tasks that reward every step (POPGym's RepeatPrevious, Autoencode's recall phase, ...), a step counts as right
when its reward is positive. ELMUR's segments are disjoint: at position p of a segment a token sees the p earlier
steps of its segment and, before them, only the memory. A task that asks for the observation of j steps ago is
answered by self-attention at positions >= j and through the memory at positions < j; this report shows which.
"""

import argparse
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_elmur  # noqa: F401
from sb3_elmur.common.utils import (
    code_commit,
    load_algorithm,
    new_report_path,
    write_text_atomically,
    zip_path,
)
from sb3_elmur.envs.popgym import is_popgym_id, make_popgym_env


def success_by_position(model: Any, env: DummyVecEnv, episodes: int) -> Tuple[np.ndarray, Dict[int, float], int]:
    """Greedy per-step success of ``model`` on ``episodes`` episodes of ``env``.

    :return: success by position in the segment ([2, K]: all segments, and those after the episode's first, where
        every position has steps before it), success by episode step (the first 2K steps), episodes finished
    """
    k = model.policy.elmur_config.context_length
    n_envs = env.num_envs
    right_by_position, count_by_position = np.zeros((2, k)), np.zeros((2, k))
    right_by_step: Dict[int, List[bool]] = {}
    obs, state = env.reset(), None
    starts, steps, finished = np.ones(n_envs, dtype=bool), np.zeros(n_envs, dtype=int), 0
    while finished < episodes:
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        obs, rewards, starts, _ = env.step(actions)
        for i, step in enumerate(steps):
            for row in range(2 if step >= k else 1):
                right_by_position[row, step % k] += rewards[i] > 0
                count_by_position[row, step % k] += 1
            right_by_step.setdefault(int(step), []).append(bool(rewards[i] > 0))
        steps = np.where(starts, 0, steps + 1)
        finished += int(starts.sum())
    n_first = min(2 * k, len(right_by_step))
    first_steps = {step: float(np.mean(right_by_step[step])) for step in range(n_first)}
    return right_by_position / np.maximum(count_by_position, 1), first_steps, finished


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/segment_positions.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("models", nargs="+", help="Saved models (zip) with an ELMUR policy, e.g. one per seed: a row "
                        "each, and their mean.")
    parser.add_argument("--algo", default="ElmurPPO", help="Algorithm class that saved them.")
    parser.add_argument("--env", required=True, help="Env id (POPGym ids get the comparison's wrappers).")
    parser.add_argument("--episodes", type=int, default=80, help="Greedy evaluation episodes per model.")
    parser.add_argument("--n-envs", type=int, default=8, help="Envs run side by side.")
    parser.add_argument("--out", default="benchmarks/results/segment_positions.md", help="Markdown report to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    for path in args.models:
        if not zip_path(path).is_file():  # the file SB3's load reads (it adds .zip)
            parser.error(f"{path}: no such model file")
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead

    if is_popgym_id(args.env):
        env = DummyVecEnv([lambda: make_popgym_env(args.env)] * args.n_envs)
    else:
        import gymnasium as gym

        env = DummyVecEnv([lambda: gym.make(args.env)] * args.n_envs)
    names = [Path(path).name for path in args.models]
    names = names if len(set(names)) == len(names) else list(args.models)
    models = [load_algorithm(args.algo, path, env=env, device="cpu") for path in args.models]
    for path, model in zip(args.models, models):
        if getattr(model.policy, "elmur_config", None) is None:
            parser.error(f"{path} holds no ELMUR policy ({type(model.policy).__name__}): nothing to cut into segments")
    lengths = sorted({model.policy.elmur_config.context_length for model in models})
    if len(lengths) > 1:
        parser.error(f"the models' segments differ in length ({lengths}): give models of one config")
    by_position, first_steps, finished = map(list, zip(*(success_by_position(m, env, args.episodes) for m in models)))
    env.close()

    (k,) = lengths
    mean = np.mean(by_position, axis=0)
    n_first = min(len(steps) for steps in first_steps)
    mean_steps = [float(np.mean([steps[step] for steps in first_steps])) for step in range(n_first)]
    several = len(args.models) > 1

    def row(name: str, values: Sequence[float]) -> str:
        return f"| {name} | " + " | ".join(f"{value:.2f}" for value in values) + " |"

    lines: List[str] = [
        f"# Greedy per-step success by position in the segment: {args.env}",
        "",
        f"Command: `python benchmarks/segment_positions.py {' '.join(args.models)} --algo {args.algo} --env {args.env} "
        f"--episodes {args.episodes} --n-envs {args.n_envs} --out {args.out}` (code {code_commit(Path(__file__).parent)}, "
        f"{date.today().isoformat()}). A step is right when its reward is positive; "
        f"{' + '.join(map(str, finished))} episodes, segments of {k} steps"
        + (f"; rows per model, then the mean over the {len(args.models)} models." if several else "."),
        "",
        "| position in segment | " + " | ".join(str(p) for p in range(k)) + " |",
        "|---|" + "---:|" * k,
        row("right, all segments" + (", mean" if several else ""), mean[0]),
        row("right, after the first" + (", mean" if several else ""), mean[1]),
    ]
    if several:
        lines += [row(f"right, after the first: {name}", positions[1]) for name, positions in zip(names, by_position)]
    lines += [
        "",
        f"By episode step (the first {n_first}{', mean over the models' if several else ''}):",
        "",
        "| episode step | " + " | ".join(str(s) for s in range(n_first)) + " |",
        "|---|" + "---:|" * n_first,
        row("right", mean_steps),
    ]
    write_text_atomically(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
