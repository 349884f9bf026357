"""One step of an exported ELMUR policy on CPU (onnxruntime, TorchScript) timed against model.predict.

    python benchmarks/export_speed.py --out benchmarks/results/export_speed.md

One acting step (greedy action, state carried to the next step, steps running through segment ends and their memory
writes) at batch 1 and batch 64, of an ElmurPolicy at its defaults on the passive T-Maze's spaces (random weights:
the time does not depend on them), or of a saved model (--model). ``predict`` carries SB3's Python overhead (its
checks, the packing of the state into a (hidden, cell) pair and back); the ONNX step runs through the runner's
``OnnxPolicy.act`` (numpy in and out), as a deployment would.
"""

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from sb3_contrib import RecurrentPPO

import sb3_elmur  # noqa: F401  (registers the policy names and the T-Maze ids)
from sb3_elmur.common.policies import ElmurPolicy
from sb3_elmur.common.utils import (
    code_commit,
    new_report_path,
    positive_int_argument,
    write_text_atomically,
)
from sb3_elmur.envs import TMazeVecEnv
from sb3_elmur.export import ExportedStep, export_policy, load_elmur_policy
from sb3_elmur.export.runner import OnnxPolicy
from sb3_elmur.export.verify import file_runner, random_observations

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import median_ms_alternating  # noqa: E402


def make_policy(model: str) -> ElmurPolicy:
    if model:
        return load_elmur_policy(model)[0]
    return RecurrentPPO("ElmurPolicy", TMazeVecEnv(1, corridor_length=10, variant="passive"), seed=0).policy


def predict_step(policy: ElmurPolicy, observations: List[np.ndarray]) -> Callable[[], None]:
    batch, state, t = len(observations[0]), None, 0
    starts = np.zeros(batch, dtype=bool)

    def step() -> None:
        nonlocal state, t
        _, state = policy.predict(observations[t % len(observations)], state, episode_start=starts, deterministic=True)
        t += 1

    return step


def onnx_step(path: Path, batch: int, observations: List[np.ndarray]) -> Callable[[], None]:
    policy, t = OnnxPolicy(str(path), batch_size=batch, threads=1), 0

    def step() -> None:
        nonlocal t
        policy.act(observations[t % len(observations)])
        t += 1

    return step


def torchscript_step(path: Path, policy: ElmurPolicy, batch: int, observations: List[np.ndarray],
                     input_names: List[str]) -> Callable[[], None]:
    run = file_runner(path, "torchscript", input_names)
    # Zero observations, the initial state, every row starting an episode: the first step's inputs.
    inputs = [x.numpy() for x in ExportedStep(policy).example_inputs(batch)]
    t = 0

    def step() -> None:
        nonlocal t
        inputs[0] = observations[t % len(observations)]
        outputs = run(inputs)
        inputs[1:-1] = outputs[2:]
        inputs[-1] = np.zeros(batch, dtype=bool)
        t += 1

    return step


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/export_speed.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="", help="A saved ELMUR model to time (empty: ElmurPolicy defaults, T-Maze).")
    parser.add_argument("--batch-sizes", type=positive_int_argument, nargs="+", default=[1, 64],
                        help="Rows per step, one case each.")
    parser.add_argument("--steps", type=positive_int_argument, default=300, help="Steps per timed round.")
    parser.add_argument("--rounds", type=positive_int_argument, default=5,
                        help="Timed rounds per case, alternating between the cases.")
    parser.add_argument("--out", default="benchmarks/results/export_speed.md", help="Report to write (Markdown).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)
    import onnxruntime

    policy = make_policy(args.model)
    cfg = policy.lstm_actor.model.config
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, script_path = Path(folder) / "policy.onnx", Path(folder) / "policy.pt"
        description = export_policy(policy, onnx_path, format="onnx", check_steps=2 * cfg.context_length)
        export_policy(policy, script_path, format="torchscript")
        input_names = [spec["name"] for spec in description["inputs"]]
        rng = np.random.default_rng(0)
        for batch in args.batch_sizes:
            # Observations drawn once, outside the timing: 2 K steps' worth, cycled.
            observations = [random_observations(policy.observation_space, batch, rng)[0]
                            for _ in range(2 * cfg.context_length)]
            steps = {
                "model.predict": predict_step(policy, observations),
                "ONNX (onnxruntime, OnnxPolicy.act)": onnx_step(onnx_path, batch, observations),
                "TorchScript": torchscript_step(script_path, policy, batch, observations, input_names),
            }
            results[str(batch)] = median_ms_alternating(steps, args.steps, args.rounds)
            print(f"batch {batch}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in results[str(batch)].items()),
                  flush=True)
    command = " ".join(["python benchmarks/export_speed.py", *sys.argv[1:]])
    model = args.model or f"ElmurPolicy defaults ({cfg.describe()}), passive T-Maze spaces, random weights"
    lines = [
        "# One exported acting step against model.predict, on CPU",
        "",
        f"Command: `{command}` (code {code_commit(Path(__file__).parent)}, "
        f"{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, one thread each). Model: {model}. Greedy actions, state carried "
        f"between steps; ms per step: median of {args.rounds} alternating rounds of {args.steps} steps. Export check: "
        f"largest difference from the torch step {max(description['check'].values()):.1e}.",
        "",
        "| batch | model.predict ms | ONNX ms | TorchScript ms | predict / ONNX | predict / TorchScript |",
        "|---|---|---|---|---|---|",
    ]
    for batch, result in results.items():
        predict, onnx, script = result.values()
        lines.append(f"| {batch} | {predict:.3f} | {onnx:.3f} | {script:.3f} | {predict / onnx:.1f}x | "
                     f"{predict / script:.1f}x |")
    text = "\n".join(lines) + "\n"
    write_text_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()
