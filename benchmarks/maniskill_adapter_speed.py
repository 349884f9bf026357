"""Env steps/s of ManiSkill tasks through sb3-elmur's ManiSkillVecEnv and through ManiSkill's own SB3 adapter.

Random actions, CPU simulation, the configurations alternated in one run (ratios, not absolute speeds: machines are
noisy). ManiSkill's adapter (``mani_skill.vector.wrappers.sb3.ManiSkillSB3VectorEnv``) steps one CPU env in this
process; ManiSkillVecEnv runs one env per worker process, so at 1 env it pays a pipe round trip per step, and with
more envs it steps them side by side. Writes a markdown table and a JSON file:

    python benchmarks/maniskill_adapter_speed.py --out benchmarks/results/maniskill_adapter_speed.md
"""

import argparse
import time
from typing import Any, Callable, Dict, List

import gymnasium as gym
import numpy as np
import torch

from sb3_elmur.envs import vulkan
from sb3_elmur.envs.maniskill import ManiSkillVecEnv
from sb3_elmur.common.utils import new_report_path, write_json_atomically, write_text_atomically


def _maniskill_adapter(env_id: str) -> Any:
    """ManiSkill's own SB3 adapter on one CPU env with state observations: it takes tensor observations only (no
    dict, so no RGB), and fails on a ``gym.make`` result under gymnasium 1.x, so it gets the unwrapped env."""
    from mani_skill.vector.wrappers.sb3 import ManiSkillSB3VectorEnv

    vulkan.activate()
    return ManiSkillSB3VectorEnv(gym.make(env_id, num_envs=1, sim_backend="cpu", obs_mode="state").unwrapped)


def steps_per_second(make: Callable[[], Any], n_steps: int) -> float:
    env = make()
    env.seed(0)
    env.reset()
    actions = np.zeros((env.num_envs, *env.action_space.shape), np.float32)
    env.step(actions)  # the first step pays for lazy set-up
    start = time.perf_counter()
    for _ in range(n_steps):
        env.step(actions)
    elapsed = time.perf_counter() - start
    env.close()
    return n_steps * env.num_envs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/maniskill_adapter_speed.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--env", default="PickCube-v1", help="ManiSkill task id.")
    parser.add_argument("--image-size", type=int, default=64, help="Camera resolution of the RGB configurations.")
    parser.add_argument("--steps", type=int, default=300, help="Steps per measurement (state; RGB: a fifth).")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds over all configurations.")
    parser.add_argument("--out", default="benchmarks/results/maniskill_adapter_speed.md", help="Markdown report.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)

    configs: Dict[str, Callable[[], Any]] = {}
    configs["ManiSkill's SB3 adapter, state, 1 env"] = lambda: _maniskill_adapter(args.env)
    for obs_mode in ("state", "rgb"):
        for n_envs in (1, 2):
            configs[f"ManiSkillVecEnv, {obs_mode}, {n_envs} env{'s' if n_envs > 1 else ''}"] = (
                lambda m=obs_mode, n=n_envs: ManiSkillVecEnv(args.env, n_envs=n, obs_mode=m, image_size=args.image_size))
    results: Dict[str, List[float]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, make in configs.items():
            n_steps = args.steps if ", state," in name else max(1, args.steps // 5)
            results[name].append(steps_per_second(make, n_steps))
            print(f"round {repeat + 1}: {name}: {results[name][-1]:.1f} env steps/s", flush=True)

    lines = [
        "# ManiSkill adapters: env steps/s",
        "",
        f"`python benchmarks/maniskill_adapter_speed.py --env {args.env} --image-size {args.image_size} "
        f"--steps {args.steps} --repeats {args.repeats}`: CPU simulation, zero actions, mean ± std over "
        f"{args.repeats} rounds (configurations alternated). RGB: {args.image_size} x {args.image_size} cameras.",
        "",
        "| configuration | env steps/s | vs ManiSkill's adapter (state) / vs ManiSkillVecEnv 1 env (rgb) |",
        "|---|---:|---:|",
    ]
    for name, values in results.items():
        reference = np.mean(results["ManiSkill's SB3 adapter, state, 1 env" if ", state," in name
                                    else "ManiSkillVecEnv, rgb, 1 env"])
        lines.append(f"| {name} | {np.mean(values):.1f} ± {np.std(values):.1f} | {np.mean(values) / reference:.2f}x |")
    lines += ["", "ManiSkill's adapter takes tensor observations only, so it has no RGB row (a dict of camera images "
              "fails in it); it also reports every env's running return in `info[\"episode\"]` on every step "
              "(`tests/test_maniskill.py::test_maniskill_own_adapter_reports_unfinished_episodes`)."]
    text = "\n".join(lines) + "\n"
    write_json_atomically(out.with_suffix(".json"), dict(args=vars(args), results=results))
    write_text_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()
