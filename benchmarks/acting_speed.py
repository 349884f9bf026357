"""Acting and training speed, baseline commit versus working tree, in one run: the T-Maze evaluation loop (policy,
heads and env, one step at a time, no grad; also compiled, ``evaluate_tmaze(compile=True)``, where the source has
it), the bare ELMUR step, RecurrentPPO's rollout step (packed state), and the model's training pass (forward and
backward over the minibatch shapes of ElmurPPO and RecurrentPPO).

    python benchmarks/acting_speed.py --baseline 0a1f5e3 --out benchmarks/results/acting_speed.md
    python benchmarks/acting_speed.py --baseline 6333240 --cases training --out benchmarks/results/training_speed.md

Each variant runs in its own subprocess that imports ``sb3_elmur`` from its source tree (the baseline is
exported with ``git archive``). Rounds alternate between the variants and the table gives the median over rounds
and the ratio baseline / current, so that load from other jobs on the machine weighs on both alike. Every child
compiles with an empty inductor cache, so the compile time is that of a first run.

The T-Maze cases act with the offline model of ``benchmarks/tmaze_offline.py`` (ElmurPolicy, seed 0, 1000 gradient
steps), ``runs/acting_speed/tmaze_offline_ElmurPolicy_s0.zip``; when that file is missing, this script trains it
there first (about 30 s; ``runs/`` is git-ignored) with the working tree's code.
"""

import argparse
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
# The offline T-Maze model the eval-loop cases act with: trained by ensure_model when missing
MODEL = ROOT / "runs" / "acting_speed" / "tmaze_offline_ElmurPolicy_s0.zip"


# Keys of a child's results that are seconds, not milliseconds per step: reported below the table.
SECONDS = "seconds: "
# Keys of a training pass's aten call count and of their sequence's fingerprint, which load on the machine cannot change
OPERATORS = "operators: "
FINGERPRINT = f"{OPERATORS}fingerprint, "


def _ms_per_call(fn: Callable[[], None], calls: int, repeats: int = 3) -> float:
    """Best of ``repeats`` means over ``calls`` consecutive calls (other jobs only ever slow a run down)."""
    warm_up(fn)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def warm_up(fn: Callable[[], None], calls: int = 30) -> float:
    """Run the first calls (compilation included, past the first segments); :return: their seconds."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def training_passes(steps: int) -> Dict[str, float]:
    """Milliseconds per forward and backward pass of the ELMUR model at D 64, 2 layers (the default config until
    2026-12-06) over minibatch shapes: ElmurPPO's at its defaults then (4 sequences of 32 steps, 16 of memory
    horizon and up to 9 of the partial segment before them: 56 steps) and RecurrentPPO's (up to 128 steps, here 1 x
    128)."""
    import torch

    try:
        from sb3_elmur.common.config import ElmurConfig
        from sb3_elmur.common.model import ElmurModel
    except ImportError:  # a baseline from before the common/ layout
        from sb3_elmur.model import ElmurConfig, ElmurModel

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    torch.manual_seed(0)
    model = ElmurModel(16, ElmurConfig(d_model=64, n_layers=2))  # the sizes of the labels, not of the defaults
    results = {}
    for rows, length, what in ((4, 56, "ElmurPPO"), (1, 128, "RecurrentPPO")):
        x = torch.randn(rows, length, 16)
        starts = torch.zeros(rows, length, dtype=torch.bool)
        starts[0, length // 2] = True  # an episode ends inside one sequence
        state = model.initial_state(rows)

        def training_pass() -> None:
            out, after = model(x, state, starts)
            model.zero_grad()
            (out.square().mean() + after.memory.square().mean()).backward()

        case = f"training pass, forward + backward, {rows} x {length} steps ({what} minibatch), D 64, 2 layers"
        results[case] = _ms_per_call(training_pass, max(steps // 10, 10))
        calls = _aten_calls(training_pass)
        results[f"{OPERATORS}{case}"] = len(calls)
        # 48 bits of the sequence's hash: exact as a JSON float, and two sequences that differ differ here
        results[f"{FINGERPRINT}{case}"] = int(hashlib.sha1("\n".join(calls).encode()).hexdigest()[:12], 16)
    return results


def _aten_calls(fn: Callable[[], None]) -> List[str]:
    """Every aten call ``fn`` makes, forward and backward, as 'operator(input shapes)', in order."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: List[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            calls.append(f"{func}{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}")
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


def ensure_model() -> None:
    """Train ``MODEL`` as ``benchmarks/tmaze_offline.py`` trains ElmurPolicy seed 0 (1000 gradient steps, about
    30 s on one thread), if it is missing."""
    if MODEL.exists():
        return
    import torch

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tmaze_offline import train

    print(f"training the offline T-Maze model {MODEL} (missing)", flush=True)
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    train("ElmurPolicy", 0, 1000, MODEL)


def child(steps: int, cases: str) -> Dict[str, float]:
    """Time every case with the ``sb3_elmur`` found first on ``sys.path``."""
    if cases == "training":
        return training_passes(steps)
    import numpy as np
    import torch
    from sb3_contrib import RecurrentPPO
    from sb3_contrib.common.recurrent.type_aliases import RNNStates

    from sb3_elmur.bc import RecurrentBC
    from sb3_elmur.envs import TMazeVecEnv
    from sb3_elmur.common.evaluation import _actor
    from sb3_elmur.common.config import ElmurConfig
    from sb3_elmur.common.model import ElmurModel

    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    results = {}
    offline = RecurrentBC.load(MODEL, device="cpu")

    def tmaze_loop(batch: int, compile: bool = False) -> None:
        # The loop of evaluate_tmaze at a 10^6 corridor (nobody reaches the junction within these steps).
        env = TMazeVecEnv(batch, corridor_length=1_000_000, variant="reference", seed=0)
        act = _actor(offline, deterministic=True, compile=True) if compile else _actor(offline, deterministic=True)
        loop = {"obs": env.reset(), "starts": np.ones(batch, dtype=bool)}

        def tmaze_step() -> None:
            loop["obs"], _, loop["starts"], _ = env.step(act(loop["obs"], loop["starts"]))

        name = f"T-Maze eval loop{', compiled' if compile else ''}, offline ElmurPolicy (D 32, 1 layer), batch {batch}"
        if compile:
            results[f"{SECONDS}first 30 steps of the compiled loop (compilation), batch {batch}"] = warm_up(tmaze_step)
        results[name] = _ms_per_call(tmaze_step, steps)

    for batch in (50, 100):
        tmaze_loop(batch)

    for d_model, n_layers, batch in ((32, 1, 50), (64, 2, 100)):
        torch.manual_seed(0)
        config = ElmurConfig(d_model=d_model, n_layers=n_layers, n_heads=2, memory_size=2, context_length=10)
        model = ElmurModel(16, config).eval()
        x, starts = torch.randn(batch, 1, 16), torch.zeros(batch, 1, dtype=torch.bool)
        carry = {"state": model.initial_state(batch), "outputs": None}

        def model_call() -> None:
            with torch.no_grad():
                _, carry["state"] = model(x, carry["state"], starts)

        def model_step() -> None:  # the acting path: ElmurModel.step with the layer outputs, where it exists
            if not hasattr(model, "step"):
                return model_call()
            with torch.no_grad():
                _, carry["state"], carry["outputs"] = model.step(x[:, 0], carry["state"], starts[:, 0], carry["outputs"])

        name = f"(D {d_model}, {n_layers} layers), batch {batch}"
        results[f"ElmurModel `model(x, state)` {name}"] = _ms_per_call(model_call, steps)
        carry["state"] = model.initial_state(batch)
        results[f"ElmurModel acting step (`model.step` + layer outputs) {name}"] = _ms_per_call(model_step, steps)

    # RecurrentPPO.collect_rollouts calls policy.forward on the packed (hidden, cell) state every step.
    env = TMazeVecEnv(16, corridor_length=1_000_000, seed=0)
    # The sizes of the label, not of the defaults (D 32, one layer since 2026-12-06), so both revisions time one model
    ppo = RecurrentPPO("ElmurPolicy", env, seed=0, device="cpu", policy_kwargs=dict(d_model=64, n_layers=2))
    policy = ppo.policy.set_training_mode(False) or ppo.policy
    obs = torch.as_tensor(env.reset())
    zero = (torch.zeros(1, 16, policy.lstm_hidden_state_shape[2]),) * 2
    packed = {"state": policy.forward(obs, RNNStates(zero, zero), torch.ones(16))[3]}
    zeros = torch.zeros(16)

    def rollout_step() -> None:
        with torch.no_grad():
            packed["state"] = policy.forward(obs, packed["state"], zeros)[3]

    results["RecurrentPPO rollout step, ElmurPolicy (D 64, 2 layers), 16 envs"] = _ms_per_call(
        rollout_step, steps
    )
    # Last: in one run, eager steps timed after a compilation in the same process were a few percent slower.
    if "compile" in inspect.signature(_actor).parameters:
        tmaze_loop(50, compile=True)
    return results if cases == "acting" else {**results, **training_passes(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/acting_speed.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--baseline", default="0a1f5e3", help="Git revision to compare the working tree against.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds per variant.")
    parser.add_argument("--steps", type=int, default=500, help="Consecutive steps per timing.")
    parser.add_argument("--cases", choices=("all", "acting", "training"), default="all", help="What to time.")
    parser.add_argument("--out", default="benchmarks/results/acting_speed.md", help="Markdown report to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report (else refused).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        # pip's editable install serves its own tree from a finder that comes before sys.path: drop it, so that the
        # child imports the tree it is given (without this, baseline and current were the same code).
        sys.meta_path[:] = [finder for finder in sys.meta_path
                            if not str(getattr(finder, "__module__", type(finder).__module__)).startswith("__editable__")]
        sys.path.insert(0, args.child)
        print(json.dumps(child(args.steps, args.cases)))
        return
    # Imported here: a child imports sb3_elmur from its own source tree (set above).
    from sb3_elmur.common.utils import code_commit, new_report_path, write_json_atomically, write_text_atomically

    out = new_report_path(parser, args.out, args.overwrite)
    if args.cases != "training":
        ensure_model()

    with tempfile.TemporaryDirectory() as baseline_dir:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "sb3_elmur"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", baseline_dir], input=archive, check=True)
        sources = {"baseline": baseline_dir, "current": str(ROOT)}
        runs: Dict[str, list] = {name: [] for name in sources}
        for round_index in range(args.rounds):
            for name, source in sources.items():
                command = [sys.executable, __file__, "--child", source, "--steps", str(args.steps), "--cases", args.cases]
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
                runs[name].append(json.loads(output.strip().splitlines()[-1]))
                print(f"round {round_index + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)

    cases = [c for c in runs["current"][0] if not c.startswith((SECONDS, OPERATORS))]
    median = {name: {c: statistics.median(r[c] for r in rs) for c in rs[0]} for name, rs in runs.items()}
    cells = {name: {c: f"{m[c]:.3f}" if c in m else "-" for c in cases} for name, m in median.items()}
    revision = code_commit(ROOT)
    command = (f"python benchmarks/acting_speed.py --baseline {args.baseline} --rounds {args.rounds} --steps {args.steps} "
               f"--cases {args.cases}")
    lines = [
        "# Acting and training speed: baseline versus current",
        "",
        f"Command: `{command}` ({platform.machine()}, Python {platform.python_version()}, one torch thread per "
        f"process); baseline `{args.baseline}`, current: working tree at `{revision}`; {date.today().isoformat()}.",
        "",
        f"Milliseconds per step or training pass (best of 3 x {args.steps} consecutive steps, or a tenth as many "
        f"passes, median over {args.rounds} alternating "
        "rounds); ratio = baseline / current. A baseline without `model.step` times `model(x, state)` as its acting step.",
        "",
        "| case | baseline ms | current ms | speed-up |",
        "|---|---|---|---|",
        *[
            f"| {c} | {cells['baseline'][c]} | {cells['current'][c]} | "
            + (f"{median['baseline'][c] / median['current'][c]:.2f}x |" if c in median["baseline"] else "- |")
            for c in cases
        ],
        "",
    ]
    compiled = [c for c in cases if ", compiled," in c]
    for c in compiled:  # against the same loop uncompiled, in the same processes
        eager = c.replace(", compiled", "")
        lines.append(f"{c}: {median['current'][eager] / median['current'][c]:.2f}x faster than uncompiled (current).")
    for c in (c for c in median["current"] if c.startswith(SECONDS)):
        lines.append(f"{c[len(SECONDS):]}: {median['current'][c]:.1f} s (median; empty inductor cache).")
    if compiled or any(c.startswith(SECONDS) for c in median["current"]):
        lines.append("")
    for c in (c for c in median["current"] if c.startswith(OPERATORS) and not c.startswith(FINGERPRINT)):
        fingerprint = FINGERPRINT + c[len(OPERATORS):]
        same = median["baseline"].get(fingerprint) == median["current"][fingerprint]
        baseline = f"{median['baseline'][c]:.0f}" if c in median["baseline"] else "-"
        lines.append(f"{c[len(OPERATORS):]}: {baseline} aten calls in the baseline, "
                     f"{median['current'][c]:.0f} now; the same operators on the same shapes in the same order: "
                     f"{'yes' if same else 'no'}.")
    if any(c.startswith(OPERATORS) for c in median["current"]):
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_text_atomically(out, text)
    write_json_atomically(out.with_suffix(".json"), {"baseline": args.baseline, "runs": runs, "median": median})


if __name__ == "__main__":
    main()
