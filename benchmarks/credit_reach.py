"""Credit reach: how often a query's loss can send gradient to the memory write of its cue, per buffer and setting.

On noisy recall (``sb3_elmur.envs.recall``: the cue at an episode's first step, the query D +- 5 steps later) a
memory write learns to keep the cue only from a training row that holds both the cue and the query: the query's
loss then reaches the write through the memory. This script fills real rollout buffers (an untrained policy
acting; the rows depend only on where episodes and rollouts start, not on the actions) and counts, over every
minibatch of one epoch of rollouts 5-16, the query steps that count in the losses and the share of them whose row
also holds their episode's cue step. Nothing is trained: the figure is a property of the buffer's sequence layout.

- RecurrentPPO (sb3-contrib's buffer): rows are runs of one env inside a minibatch of ``batch_size`` consecutive
  steps of the flattened rollout (split at a random index), cut at episode starts; a row's state comes from the
  rollout, without gradient.
- ElmurPPO: rows are chunks of ``sequence_length`` steps plus the ``memory_horizon`` steps before them, cut at
  episode starts.

    python benchmarks/credit_reach.py
"""

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sb3_elmur.common.utils import code_commit, write_text_atomically  # noqa: E402

N_CUES = 3
DELAYS = [30, 60, 120, 250]
SETTINGS: List[Dict[str, Any]] = [
    dict(algo="RecurrentPPO", n_steps=128, batch_size=128),
    dict(algo="RecurrentPPO", n_steps=128, batch_size=256),
    dict(algo="ElmurPPO", n_steps=128, batch_size=128, sequence_length=32, memory_horizon=16),
    dict(algo="ElmurPPO", n_steps=128, batch_size=128, sequence_length=128, memory_horizon=16),
    dict(algo="ElmurPPO", n_steps=128, batch_size=128, sequence_length=128, memory_horizon=128),
    dict(algo="ElmurPPO", n_steps=128, batch_size=128, sequence_length=128, memory_horizon=256),
]


def reach(setting: Dict[str, Any], delay: int, rollouts: int = 16, seed: int = 0) -> float:
    """Share of the query steps in the losses whose training row also holds their cue step."""
    from sb3_contrib import RecurrentPPO

    from sb3_elmur import ElmurPPO
    from sb3_elmur.envs.recall import NoisyRecallVecEnv

    kwargs = {k: v for k, v in setting.items() if k != "algo"}
    env = NoisyRecallVecEnv(8, n_cues=N_CUES, length=(delay - 5, delay + 5), noise_dims=2, seed=seed)
    cls = ElmurPPO if setting["algo"] == "ElmurPPO" else RecurrentPPO
    model = cls("ElmurPolicy", env, seed=seed, policy_kwargs=dict(d_model=16, n_layers=1), **kwargs)
    _, callback = model._setup_learn(rollouts * model.n_steps * 8, None)
    queries = covered = 0
    for rollout in range(rollouts):
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        if rollout < 4:  # the first rollouts fill ElmurPPO's history (and start every env's episode together)
            continue
        for data in model.rollout_buffer.get(model.batch_size):
            states = data.lstm_states
            n_rows = states.step.shape[0] if hasattr(states, "step") else states.pi[0].shape[1]
            obs = torch.as_tensor(data.observations).view(n_rows, -1, env.observation_space.shape[0])
            mask = torch.as_tensor(data.mask).view(n_rows, -1) > 0.5
            query = (obs[..., N_CUES] > 0.5) & mask
            cue = obs[..., :N_CUES].max(dim=-1).values > 0.5
            # Rows are cut at episode starts: a cue anywhere before a query in its row is that episode's cue.
            cue_before = cue.int().cumsum(dim=1) > 0
            queries += int(query.sum())
            covered += int((query & cue_before).sum())
    return covered / max(queries, 1)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/credit_reach.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/credit_reach.md"),
                        help="Report, a Markdown table.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    commit = code_commit(Path(__file__).parent)
    lines = [f"# Credit reach: share of query steps whose training row holds their cue ({date.today()}, code {commit})",
             "", "Command: `python benchmarks/credit_reach.py`. Noisy recall with the query D +- 5 steps after the cue, "
             "8 envs, one epoch of minibatches of each of rollouts 5 to 16 (see the script's docstring).", "",
             "| buffer | settings | " + " | ".join(f"D = {d}" for d in DELAYS) + " |",
             "|---|---|" + "---|" * len(DELAYS)]
    for setting in SETTINGS:
        shares = [reach(setting, delay) for delay in DELAYS]
        settings = ", ".join(f"{k}={v}" for k, v in setting.items() if k != "algo")
        lines.append(f"| {setting['algo']} | {settings} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
        print(lines[-1], flush=True)
    write_text_atomically(args.out, "\n".join(lines) + "\n")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
