"""What an opt-in model option costs (cross-segment attention, reservoir layers): acting and training time, state
and buffer bytes, at each of its values against the default, at the default config and at a wide one, in one run.

    python benchmarks/option_cost.py --option cross_segment_attention   # benchmarks/results/cross_segment_cost.md
    python benchmarks/option_cost.py --option reservoir_layers          # benchmarks/results/reservoir_cost.md

Acting: ElmurPPO's acting step (``ElmurActor``, heads, action sampling, value) for 8 envs, eager. Training: one
forward and backward pass of the ELMUR model over one minibatch of ElmurPPO's defaults (``batch_size //
sequence_length`` sequences of ``sequence_length`` steps after ``memory_horizon + K - 1`` steps of history). Bytes: one env's
ElmurState, RecurrentPPO's packed state per env and step, and ElmurPPO's stored state per env and step.
"""

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any, Dict

import torch

import sb3_elmur  # noqa: F401
from sb3_elmur import ElmurPPO
from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.utils import (
    code_commit,
    new_report_path,
    positive_int_argument,
    write_text_atomically,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reports.py, also when run by runpy
from reports import elmur_acting_step, median_ms_alternating, tmaze_env  # noqa: E402

CONFIGS = {"default": {}, "wide": dict(d_model=128, n_layers=4, n_heads=4, memory_size=4, context_length=32)}
# Each option's values, the default first (the ratios' reference), and its report's title and file.
OPTIONS: Dict[str, Dict[str, Any]] = {
    "cross_segment_attention": {"values": ["off", "previous", "window"], "title": "Cross-segment attention: what it costs",
                                "out": "benchmarks/results/cross_segment_cost.md"},
    "reservoir_layers": {"values": [0, 1, 2], "title": "Reservoir layers: what they cost",
                         "out": "benchmarks/results/reservoir_cost.md"},
}


def build(config: Dict[str, Any], option: str, value: Any, n_envs: int) -> Dict[str, Any]:
    """An ElmurPPO of the config with ``option=value`` on T-Maze, and its acting and training closures."""
    env = tmaze_env(n_envs)
    model = ElmurPPO("ElmurPolicy", env, seed=0, policy_kwargs=dict(config, **{option: value}))
    policy, elmur = model.policy, model.policy.lstm_actor.model
    act = elmur_acting_step(policy, env)

    buffer = model.rollout_buffer
    rows = max(1, model.batch_size // buffer.sequence_length)  # sequences of one minibatch
    length = buffer.sequence_length + buffer.history_length
    x = torch.randn(rows, length, elmur.input_dim)

    def train() -> None:
        out, _ = elmur(x, elmur.initial_state(rows))
        out.square().mean().backward()

    return {
        "act": act, "train": train,
        "state_bytes": elmur.config.state_bytes(),
        "packed_bytes": 2 * policy.lstm_actor.hidden_size * 4,
        "buffer_bytes_per_step": buffer.state_nbytes() / (buffer.buffer_size * buffer.n_envs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/option_cost.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--option", choices=sorted(OPTIONS), default="cross_segment_attention",
                        help="The ElmurConfig option to measure, at each of its values.")
    parser.add_argument("--n-envs", type=positive_int_argument, default=8, help="Envs acted for at once.")
    parser.add_argument("--acting-steps", type=positive_int_argument, default=300, help="Acting steps per timed round.")
    parser.add_argument("--training-passes", type=positive_int_argument, default=5,
                        help="Training passes per timed round.")
    parser.add_argument("--rounds", type=positive_int_argument, default=5,
                        help="Timed rounds per case, alternating between the option's values.")
    parser.add_argument("--out", help="Report to write (Markdown); by default the option's file in benchmarks/results.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    args = parser.parse_args()
    option = OPTIONS[args.option]
    out = new_report_path(parser, args.out or option["out"], args.overwrite)
    default = str(option["values"][0])
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for config_name, config in CONFIGS.items():
        cases = {str(value): build(config, args.option, value, args.n_envs) for value in option["values"]}
        acting = median_ms_alternating({value: case["act"] for value, case in cases.items()}, args.acting_steps, args.rounds)
        training = median_ms_alternating({value: case["train"] for value, case in cases.items()}, args.training_passes,
                                         args.rounds, warmup=3)
        results[config_name] = {
            value: {"acting_ms": acting[value], "training_ms": training[value],
                    **{key: float(number) for key, number in case.items() if key.endswith("bytes") or key.endswith("step")}}
            for value, case in cases.items()
        }
    lines = [
        f"# {option['title']}",
        "",
        f"Command: `python benchmarks/option_cost.py {' '.join(sys.argv[1:])}` (code "
        f"{code_commit(Path(__file__).parent)}, {date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, one thread). Acting: one ElmurPPO "
        f"rollout step of {args.n_envs} envs (policy, heads, sampling, value; eager), median of {args.rounds} alternating "
        f"rounds of {args.acting_steps} steps. Training: forward and backward over one minibatch of ElmurPPO's default "
        f"shape, median of {args.rounds} rounds of {args.training_passes}. Ratios are against {args.option}={default} "
        "(the default), in the same run.",
        "",
        f"Configs: default = `{ElmurConfig().describe()}` (the defaults of this commit); wide = `{CONFIGS['wide']}`.",
        "",
        f"| config | {args.option} | acting ms/step | x {default} | training ms/pass | x {default} | state bytes/env | "
        "RecurrentPPO packed bytes/env/step | ElmurPPO stored bytes/env/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config_name, values in results.items():
        reference = values[default]
        for value, r in values.items():
            lines.append(
                f"| {config_name} | {value} | {r['acting_ms']:.3f} | {r['acting_ms'] / reference['acting_ms']:.2f} | "
                f"{r['training_ms']:.1f} | {r['training_ms'] / reference['training_ms']:.2f} | {r['state_bytes']:.0f} | "
                f"{r['packed_bytes']:.0f} | {r['buffer_bytes_per_step']:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    write_text_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()
