"""Where the cue is lost online: probes of an ElmurPolicy's memory while PPO trains it on noisy recall.

Trains on ``recall-D`` (the task of ``benchmarks/online_memory.py``: one of 3 cues at the first step, Gaussian noise
at every step, the query at step D +- 5) and, every ``--probe-every`` env steps, acts greedily on 400 episodes of
evaluation seeds the training never saw and measures, at each episode's query step:

- ``success``: the greedy answer names the cue;
- ``entropy``: the policy's entropy at the query (exploration left; ln 3 = 1.10 is uniform);
- ``write``: a linear probe's accuracy at reading the cue from each layer's memory right after the first segment
  (the one holding the cue) is written: did the write store it? (ridge regression on one half of the episodes,
  accuracy on the other; chance 0.33);
- ``held``: the same probe on each layer's memory at the query: is the cue still there when it is needed?
  Where ``write`` is high and ``held`` is at chance, slot replacement or drift lost it (capacity); where both are
  high and ``success`` is at chance, the read or the heads did not learn to use it;
- ``output``: the same probe on the actor's latent at the query (what the policy head reads): does the cue
  reach the output of the step that needs it?
- ``slot_step``: the episode step of the last write of the single slot that best holds the cue at the query (0 to
  K-1: the original write survived; later: the cue was copied forward by later writes);
- ``grad_ratio``: over 64 episodes, the norm of the query loss's gradient (cross-entropy of the right answer) with
  respect to the memory written after the first segment, divided by its norm with respect to the memory the query
  reads: how much of the learning signal reaches back to the cue's write (reach through the chain of writes).

Results go to ``OUT.json`` (a run per label and seed, recorded atomically as it finishes) and ``OUT.md``. Example:

    python benchmarks/memory_probe.py --delay 60 --seeds 0 --budget 150000
"""

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sb3_elmur.common.utils import (  # noqa: E402
    code_commit, exclusive_lock, positive_int_argument, write_json_atomically, write_text_atomically,
)

N_PROBE = 400  # probe episodes: half to fit the probe, half to score it
N_GRAD = 64  # episodes of the gradient measure
PROBE_SEED = 20_000  # probe episodes come from seeds PROBE_SEED + seed, never used in training


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, n_classes: int, l2: float = 1.0) -> float:
    """Held-out accuracy of a ridge regression onto one-hot labels (fit on the first half, scored on the second)."""
    half = len(labels) // 2
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-6
    x = (features - mean) / std
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    targets = np.eye(n_classes)[labels[:half]]
    weights = np.linalg.solve(x[:half].T @ x[:half] + l2 * np.eye(x.shape[1]), x[:half].T @ targets)
    return float(np.mean((x[half:] @ weights).argmax(1) == labels[half:]))


def probe(policy: Any, delay: int, seed: int) -> Dict[str, Any]:
    """The measures of the module's docstring, for ``policy`` (an ElmurPolicy) on noisy recall at ``delay``."""
    import torch as th

    from sb3_elmur.envs.recall import NoisyRecallVecEnv
    from sb3_elmur.common.actor import ElmurActor

    policy.set_training_mode(False)
    model = policy.lstm_actor.model
    k, n_cues = model.config.context_length, 3
    env = NoisyRecallVecEnv(N_PROBE, n_cues=n_cues, length=(delay - 5, delay + 5), noise_dims=2, seed=PROBE_SEED + seed)
    obs = env.reset()
    cue = obs[:, :n_cues].argmax(1)
    actor = ElmurActor(policy, N_PROBE)
    starts = th.ones(N_PROBE, dtype=th.bool)
    finished = np.zeros(N_PROBE, dtype=bool)
    after_write = None
    # memory and slot positions at each episode's query step (filled in as the queries come)
    held, positions = actor.state.memory.clone(), actor.state.positions.clone()
    correct = np.zeros(N_PROBE, dtype=bool)
    entropy = np.zeros(N_PROBE)
    query_latent = None  # what the heads see at the query
    with th.no_grad():
        for t in range(delay + 5):
            query = (obs[:, n_cues] == 1.0) & ~finished
            if query.any():
                rows = th.as_tensor(query)
                held = th.where(rows.view(-1, 1, 1, 1), actor.state.memory, held)
                positions = th.where(rows.view(-1, 1, 1), actor.state.positions, positions)
            latent_pi, _ = actor.step(th.as_tensor(obs), starts)
            logits = policy.action_net(latent_pi)
            if t == k - 1:  # the first segment has just been written
                after_write = actor.state.memory.clone()
            if query.any():
                query_latent = latent_pi.clone() if query_latent is None else query_latent
                query_latent[rows] = latent_pi[rows]
                log_p = th.log_softmax(logits, dim=1)
                entropy[query] = -(log_p.exp() * log_p).sum(1).numpy()[query]
                correct[query] = logits.argmax(1).numpy()[query] == cue[query]
            obs, _, dones, _ = env.step(logits.argmax(1).numpy())
            finished |= dones
            starts = th.as_tensor(dones)
    n_layers, n_slots = held.shape[1], held.shape[2]
    write_acc = [ridge_accuracy(after_write[:, layer].flatten(1).numpy(), cue, n_cues) for layer in range(n_layers)]
    held_acc = [ridge_accuracy(held[:, layer].flatten(1).numpy(), cue, n_cues) for layer in range(n_layers)]
    slot_steps = []
    for layer in range(n_layers):
        per_slot = [ridge_accuracy(held[:, layer, slot].numpy(), cue, n_cues) for slot in range(n_slots)]
        # slots are used in turn, so "the best slot" is a slot index; its write step differs per episode: median
        best = int(np.argmax(per_slot))
        slot_steps.append(float(np.median(positions[:, layer, best].numpy())))
    return {"success": float(correct.mean()), "entropy": float(entropy.mean()), "write": write_acc,
            "held": held_acc, "output": ridge_accuracy(query_latent.numpy(), cue, n_cues), "slot_step": slot_steps, "grad_ratio": gradient_ratio(policy, delay, seed)}


def gradient_ratio(policy: Any, delay: int, seed: int) -> Optional[float]:
    """||d loss / d memory after the first segment|| / ||d loss / d memory read at the query|| (see the docstring)."""
    import torch as th

    from sb3_elmur.envs.recall import NoisyRecallVecEnv
    from sb3_elmur.common.actor import ElmurActor

    model = policy.lstm_actor.model
    if not any(parameter.requires_grad for parameter in model.parameters()):
        return None  # a frozen backbone: no gradient flows into memory
    k, n_cues = model.config.context_length, 3
    length = delay  # one length for every episode: their queries fall on one step
    env = NoisyRecallVecEnv(N_GRAD, n_cues=n_cues, length=length, noise_dims=2, seed=PROBE_SEED + 1000 + seed)
    obs = env.reset()
    cue = th.as_tensor(obs[:, :n_cues].argmax(1))
    actor = ElmurActor(policy, N_GRAD)
    starts = th.ones(N_GRAD, dtype=th.bool)
    first = None
    for t in range(length):
        if t == length - 1:
            read = actor.state.memory
            read.retain_grad()
        latent_pi, _ = actor.step(th.as_tensor(obs), starts)
        if t == k - 1:
            first = actor.state.memory
            first.retain_grad()
        starts = th.zeros(N_GRAD, dtype=th.bool)
        if t < length - 1:
            obs, _, _, _ = env.step(np.zeros(N_GRAD, dtype=np.int64))
    loss = th.nn.functional.cross_entropy(policy.action_net(latent_pi), cue)
    policy.zero_grad()
    loss.backward()
    policy.zero_grad()
    return float(first.grad.norm() / read.grad.norm().clamp(min=1e-12))


def run(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    import torch as th

    th.set_num_threads(1)
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback

    from online_memory import N_ENVS, make_env
    from sb3_elmur import ElmurPPO

    task = dict(kind="recall", delay=args.delay)
    cls = ElmurPPO if args.algo == "ElmurPPO" else RecurrentPPO
    # --freeze-backbone: only the heads learn: can PPO read the cue from a latent that holds it?
    policy_kwargs = {**args.policy_kwargs, **({"freeze_backbone": True} if args.freeze_backbone else {})}
    model = cls("ElmurPolicy", make_env(task, N_ENVS, seed), seed=seed, policy_kwargs=policy_kwargs or None,
                **args.ppo_kwargs)
    if args.backbone_lr_scale != 1.0:  # the backbone learns slower than the heads: does the cue stay in the latent?
        backbone = list(model.policy.lstm_actor.parameters())
        ids = {id(p) for p in backbone}
        heads = [p for p in model.policy.parameters() if id(p) not in ids]
        optimizer = model.policy.optimizer_class([{"params": heads}, {"params": backbone}], lr=model.lr_schedule(1),
                                                 **model.policy.optimizer_kwargs)

        def scale_backbone_lr(opt: Any, *_: Any) -> None:  # SB3 sets every group's rate before each update
            opt.param_groups[1]["lr"] = opt.param_groups[0]["lr"] * args.backbone_lr_scale

        optimizer.register_step_pre_hook(scale_backbone_lr)
        model.policy.optimizer = optimizer
    probes = [{"steps": 0, **probe(model.policy, args.delay, seed)}]
    print(f"seed {seed}: {probes[-1]}", flush=True)

    class Probe(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next = args.probe_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += args.probe_every
                probes.append({"steps": self.num_timesteps, **probe(model.policy, args.delay, seed)})
                print(f"seed {seed}: {probes[-1]}", flush=True)
            return True

    began = time.perf_counter()
    model.learn(args.budget, callback=Probe())
    return {"label": args.label, "algo": args.algo, "seed": seed, "delay": args.delay, "budget": args.budget,
            "ppo_kwargs": args.ppo_kwargs, "policy_kwargs": args.policy_kwargs, "probes": probes,
            "freeze_backbone": args.freeze_backbone,
            "backbone_lr_scale": args.backbone_lr_scale,
            "wall_s": time.perf_counter() - began}


def report(out: Path, runs: List[Dict[str, Any]]) -> None:
    lines = ["# Where the cue is lost online (benchmarks/memory_probe.py)", "",
             "Noisy recall online, 8 envs. At each checkpoint, on 400 evaluation episodes: greedy success, entropy at "
             "the query, linear-probe accuracy of the cue from each layer's memory right after the cue's segment is "
             "written (`write`) and at the query (`held`) (chance 0.33), the median write step of the slot that "
             "best holds it at the query, and the query loss's gradient on the cue's write over the one on the "
             "memory it reads (`grad ratio`); `output`: the probe on the actor's latent at the query (what the "
             "policy head reads). Layers are listed first to last.", ""]
    lines += summary(runs)
    for run_ in sorted(runs, key=lambda r: (r["delay"], r["label"], r["seed"])):
        lines += [f"## delay {run_['delay']}, {run_['label']}, seed {run_['seed']}", "",
                  f"`{run_['command']}` ({run_['commit']}, {run_['date']})", "",
                  "| env steps | success | entropy | write | held | output | slot step | grad ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in run_["probes"]:
            output = f"{p['output']:.2f}" if "output" in p else "-"  # runs before the output probe have none
            grad_ratio = "-" if p["grad_ratio"] is None else f"{p['grad_ratio']:.3f}"
            lines.append(f"| {p['steps']:,} | {p['success']:.2f} | {p['entropy']:.2f} | "
                         f"{' / '.join(f'{a:.2f}' for a in p['write'])} | {' / '.join(f'{a:.2f}' for a in p['held'])} | "
                         f"{output} | {' / '.join(f'{s:.0f}' for s in p['slot_step'])} | {grad_ratio} |")
        lines.append("")
    write_text_atomically(out.with_suffix(".md"), "\n".join(lines))


def summary(runs: List[Dict[str, Any]]) -> List[str]:
    """One row per delay, algorithm and label: final success and cue held at the query (minimum over layers), mean
    +- std over its seeds."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for run_ in runs:
        groups.setdefault((run_["delay"], run_["algo"], run_["label"]), []).append(run_)
    lines = ["## Summary: at the end of training", "",
             "| delay | algorithm | label | seeds | final success | held |", "|---|---|---|---|---|---|"]
    for (delay, algo, label), group in sorted(groups.items()):
        finals = [r["probes"][-1] for r in sorted(group, key=lambda r: r["seed"])]
        success = np.array([p["success"] for p in finals])
        held = np.array([min(p["held"]) for p in finals])
        lines.append(f"| {delay} | {algo} | {label} | {', '.join(str(r['seed']) for r in sorted(group, key=lambda r: r['seed']))} "
                     f"| {success.mean():.2f} +- {success.std():.2f} ({', '.join(f'{s:.2f}' for s in success)}) "
                     f"| {held.mean():.2f} +- {held.std():.2f} |")
    return lines + [""]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/memory_probe.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--delay", type=positive_int_argument, default=60, help="Steps from the cue to the query (+- 5).")
    parser.add_argument("--algo", choices=["ElmurPPO", "RecurrentPPO"], default="ElmurPPO", help="The algorithm.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="Training seeds, one run each.")
    parser.add_argument("--label", default="defaults", help="Name of these runs in the report.")
    parser.add_argument("--ppo-kwargs", type=json.loads, default={}, help="Algorithm settings beyond the defaults, as JSON.")
    parser.add_argument("--policy-kwargs", type=json.loads, default={}, help="Policy settings beyond the defaults, as JSON.")
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0,
                        help="The ELMUR backbone's learning rate as a fraction of the heads' (a diagnosis, not an option).")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="Train the heads only, the ELMUR backbone kept at its initial weights.")
    parser.add_argument("--budget", type=positive_int_argument, default=150_000, help="Env steps per run.")
    parser.add_argument("--probe-every", type=positive_int_argument, default=25_000, help="Env steps between probes.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_probe",
                        help="Results path without suffix: OUT.json and OUT.md.")
    args = parser.parse_args(argv)
    if args.delay <= 5:
        parser.error(f"--delay must be more than 5 (the query falls at delay +- 5), got {args.delay}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    header = {"commit": code_commit(Path(__file__).parent), "date": date.today().isoformat(),
              "command": "python benchmarks/memory_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        result = {**run(args, seed), **header}
        with exclusive_lock(args.out.with_suffix(".lock"), wait=True):  # parallel invocations take turns
            path = args.out.with_suffix(".json")
            runs = json.loads(path.read_text())["runs"] if path.exists() else []
            key = (result["delay"], result["label"], result["seed"])
            runs = [r for r in runs if (r["delay"], r["label"], r["seed"]) != key] + [result]
            write_json_atomically(path, {"runs": runs})
            report(args.out, runs)
    print(f"report: {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
