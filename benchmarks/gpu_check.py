"""One prepared check of the GPU code paths: CUDA tests, MIKASA-Robo training speed and memory, acting with CUDA graphs.

On a machine with one CUDA GPU, in at most 8 minutes (the default budget, 450 s, bounds every section):

    python benchmarks/gpu_check.py --out $OUT/gpu_check.md

Sections, each in its own process with its own share of the budget; a failure or a time-out is recorded in the report
and the next section runs (the exit code is 1 if any failed):

1. ``tests``: the CUDA tests, ``python -m pytest -m cuda`` on the test files that have some (rollouts equal training
   on CUDA, GPU-simulated ManiSkill into ElmurPPO, the host syncs of a rollout step counted by
   ``torch.cuda.set_sync_debug_mode``).
2. ``rgb+joints``: RememberColor3-v0 with 256 GPU-simulated envs, both cameras at 128 x 128 and the joints (MIKASA-Robo's
   memory setting): ElmurPPO + MultiInputElmurPolicy (observations, actions, rewards and dones on the GPU) and
   RecurrentPPO + MultiInputLstmPolicy, with the settings of ``benchmarks/maniskill_gpu.py``: env steps/s in rollout and
   in training (the second of two iterations: the first warms up), peak GPU memory; then ElmurPPO's acting step eager,
   compiled (``compile_acting``) and through CUDA graphs (``torch.compile(mode="reduce-overhead")``).
3. ``state``: the same in the task's plain state mode (ElmurPolicy and MlpLstmPolicy).

The report (command, code commit, date, device) is rewritten as results come in, so a time-out leaves what was done.
Nothing is downloaded: the machine needs torch with CUDA and what the README's test command installs, ``pip install
-e ".[dev,maniskill]" && pip install --no-deps mikasa-robo-suite==1.0.0``, and a Vulkan driver (NVIDIA's) for SAPIEN.
``--dry-run`` runs the same code on the CPU, with CPU simulation, one env, 36 x 36 images and rollouts of 8 steps, and
compiles with dynamo's eager backend (no code generation), in about a minute; its test and that of
``benchmarks/maniskill_gpu.py --dry-run`` are slow tests, to run before a device session: ``python -m pytest -m slow -k
dry_run``.
"""

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's code, whatever else is installed
from sb3_elmur.common.utils import code_commit, new_report_path, write_json_atomically, write_text_atomically  # noqa: E402

SECTIONS = ("tests", "rgb+joints", "state")
SHARES = {"tests": 0.17, "rgb+joints": 0.45, "state": 0.38}  # of the budget; training and compiling take the most
TITLES = {"tests": "CUDA tests", "rgb+joints": "RGB + joints", "state": "plain state"}
CASES = ("ElmurPPO", "RecurrentPPO")
EAGER, GRAPHS, COMPILED = "eager", "CUDA graphs (reduce-overhead)", "compile_acting=True"
ACTING = (EAGER, GRAPHS, COMPILED)  # in order of importance
PART_MINIMUM_S = 15  # a part that starts with less time left would only be cut


def sizes(dry_run: bool) -> Dict[str, Any]:
    """Envs, image side, rollout steps and iterations of the real check or of the dry run."""
    if dry_run:
        return dict(n_envs=1, image_size=36, n_steps=8, iterations=2, sim_backend="cpu", device="cpu")
    return dict(n_envs=256, image_size=128, n_steps=60, iterations=2, sim_backend="gpu", device="cuda")


# -- one section in its own process ------------------------------------------------------------------------------


def _record(results: Dict[str, Any], path: Path, name: str, run: Callable[[], Dict[str, Any]], deadline: float) -> bool:
    """Run one part of a section, recording its result, its failure or its skip under ``name``; save the results."""
    left = deadline - time.time()
    if left < PART_MINIMUM_S:
        results[name] = {"skipped": f"out of time ({left:.0f} s of the section's budget left)"}
    else:
        start = time.time()
        try:
            results[name] = {**run(), "seconds": round(time.time() - start, 1)}
        except Exception as error:  # recorded; the next part runs
            results[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300],
                             "traceback": traceback.format_exc()[-2500:]}
    write_json_atomically(path, results)
    return "error" not in results[name] and "skipped" not in results[name]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory(device: str) -> Dict[str, float]:
    """Peak memory so far: torch's allocator on a GPU (and the device's memory in use, the simulator's included);
    the process's peak resident memory on the CPU."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return {"torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "device_used_gib": (total - free) / 2**30}
    import resource

    return {"process_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _train(case: str, env: Any, obs_mode: str, size: Dict[str, Any]) -> Dict[str, Any]:
    """Two iterations (rollout, update) of ``case`` on ``env``: their wall times, env steps/s and peak memory."""
    from maniskill_gpu import POLICIES
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback

    from sb3_elmur import ElmurPPO

    device, n_envs, n_steps = size["device"], size["n_envs"], size["n_steps"]
    settings = dict(POLICIES["elmur" if case == "ElmurPPO" else "lstm"])
    policy = settings.pop("policy")
    if obs_mode == "state":  # one vector
        policy = {"MultiInputElmurPolicy": "ElmurPolicy", "MultiInputLstmPolicy": "MlpLstmPolicy"}[policy]
    # ElmurPPO speaks tensors with a GPU-simulated env; RecurrentPPO takes numpy arrays
    env.device_observations = case == "ElmurPPO" and size["sim_backend"] == "gpu"

    class Phases(BaseCallback):
        """Wall time of every rollout and of the update after it, the device synchronised at the edges."""

        def __init__(self) -> None:
            super().__init__()
            self.rollouts: List[float] = []
            self.updates: List[float] = []
            self.edge = time.perf_counter()

        def _mark(self, into: List[float]) -> None:
            _synchronize(device)
            now = time.perf_counter()
            into.append(now - self.edge)
            self.edge = now

        def _on_rollout_start(self) -> None:
            self._mark(self.updates)

        def _on_rollout_end(self) -> None:
            self._mark(self.rollouts)

        def _on_training_end(self) -> None:
            self._mark(self.updates)

        def _on_step(self) -> bool:
            return True

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    algorithm = ElmurPPO if case == "ElmurPPO" else RecurrentPPO
    model = algorithm(policy, env, n_steps=n_steps, batch_size=max(n_steps, n_envs * n_steps // 8), n_epochs=4,
                      learning_rate=3e-4, ent_coef=0.01, seed=0, device=device, **settings)
    phases = Phases()
    model.learn(size["iterations"] * n_envs * n_steps, callback=phases)
    rollout, update = phases.rollouts[-1], phases.updates[-1]  # the first iteration warms up
    steps = n_envs * n_steps
    result = {"policy": policy, "rollout_steps_per_s": steps / rollout, "train_steps_per_s": steps / update,
              "total_steps_per_s": steps / (rollout + update), "iterations": [
                  {"rollout_s": r, "update_s": u} for r, u in zip(phases.rollouts, phases.updates[1:])],
              **_memory(device)}
    if case == "ElmurPPO":
        result["model"] = model.policy  # kept for the acting parts (not saved)
    return result


def _act(policy: Any, obs: Any, variant: str, size: Dict[str, Any], steps: int = 50) -> Dict[str, Any]:
    """ElmurPPO's acting step (actor, action, log-prob and value) of every env, timed over ``steps`` steps after two
    segments of warm-up (compiling every graph: on the CPU, steps that complete a segment have their own)."""
    from sb3_elmur.common.actor import ElmurActor
    from sb3_elmur.ppo.ppo import as_device_tensor

    device, n_envs = size["device"], size["n_envs"]
    dry = size["sim_backend"] == "cpu"
    actor = ElmurActor(policy, n_envs, compile=variant == COMPILED and not dry)
    if variant != EAGER and dry:  # dry run: dynamo traces the same function, no code is generated
        actor.compiled = torch.compile(actor._step_core, backend="eager", fullgraph=True, dynamic=False)
    elif variant == GRAPHS:
        actor.compiled = torch.compile(actor._step_core, mode="reduce-overhead", fullgraph=True, dynamic=False)
    graphs = variant == GRAPHS and not dry
    obs = as_device_tensor(obs, torch.device(device))
    starts = torch.zeros(n_envs, dtype=torch.bool, device=device)

    def step() -> None:
        if graphs:  # a new step: the graph's outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        actor.sample(obs, starts)

    start = time.perf_counter()
    for _ in range(2 * policy.elmur_config.context_length + 1):
        step()
    _synchronize(device)
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    ms = (time.perf_counter() - start) / steps * 1e3
    return {"ms_per_step": ms, "env_steps_per_s": n_envs / ms * 1e3, "warm_up_s": warm_up}


def run_section(obs_mode: str, task: str, size: Dict[str, Any], deadline: float, path: str) -> None:
    """A training section (one observation mode), run in its own process: results saved to ``path`` as they come."""
    torch.set_num_threads(1)
    results: Dict[str, Any] = {}
    path = Path(path)
    env_box: Dict[str, Any] = {}

    def build() -> Dict[str, Any]:
        from sb3_elmur.envs.maniskill import ManiSkillVecEnv

        env_box["env"] = ManiSkillVecEnv(task, n_envs=size["n_envs"], obs_mode=obs_mode, image_size=size["image_size"],
                                         sim_backend=size["sim_backend"], seed=0)
        return {"observation_space": str(env_box["env"].observation_space)}

    if not _record(results, path, "env", build, deadline):
        return
    env, policy = env_box["env"], None
    for case in CASES:
        box: Dict[str, Any] = {}

        def train(case: str = case) -> Dict[str, Any]:
            result = _train(case, env, obs_mode, size)
            box["policy"] = result.pop("model", None)
            return result

        _record(results, path, case, train, deadline)
        policy = box.get("policy") or policy
        gc.collect()  # the model and its buffers (SB3's callbacks hold reference cycles)
        if size["device"] == "cuda":
            torch.cuda.empty_cache()
    if policy is None:
        results["acting"] = {"skipped": "no ElmurPPO model"}
        write_json_atomically(path, results)
    else:
        env.device_observations = size["sim_backend"] == "gpu"
        obs = env.reset()
        for variant in ACTING:
            _record(results, path, f"acting: {variant}", lambda variant=variant: _act(policy, obs, variant, size), deadline)
    env.close()


# -- the CUDA tests ----------------------------------------------------------------------------------------------


def run_tests(budget: float) -> Dict[str, Any]:
    """``pytest -m cuda`` on the test files that have CUDA tests, within ``budget`` seconds."""
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                   if "@pytest.mark.cuda" in path.read_text())
    # -n 0: one process (the suite's default spreads files over the cores), so the GPU is not shared
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-rA", "-p", "no:cacheprovider", *files]
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        output, code = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (
            error.stdout or ""), None
    lines = output.splitlines()
    outcomes = [line for line in lines if line.split(" ", 1)[0] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL")]
    result = {"command": " ".join(["python", *command[1:]]), "exit_code": code, "outcomes": outcomes,
              "summary": lines[-1] if lines else "", "seconds": round(time.time() - start, 1)}
    if code is None:
        result["error"] = f"timed out after {budget:.0f} s"
    elif code != 0:  # 5: no test collected, which is a failure here too
        result["error"] = f"pytest exited with {code}"
        result["traceback"] = "\n".join(lines[-60:])
    return result


# -- the report --------------------------------------------------------------------------------------------------


def _number(value: Optional[float], digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _failure(name: str, result: Dict[str, Any]) -> List[str]:
    if "skipped" in result:
        return [f"- {name}: skipped, {result['skipped']}"]
    lines = [f"- {name}: **failed**, {result['error']}"]
    if result.get("traceback"):
        lines += ["", "```", result["traceback"].rstrip(), "```"]
    return lines


def render(header: List[str], sections: Dict[str, Dict[str, Any]], size: Dict[str, Any], task: str) -> str:
    """The report's Markdown: header, then every section with its results so far."""
    lines = list(header)
    for name, state in sections.items():
        if name == "tests":
            lines += ["", f"## {TITLES[name]} ({state.get('status', 'waiting')})", ""]
            result = state.get("result")
            if result:
                lines += [f"`{result['command']}`: {result['summary']} ({result['seconds']} s)", "", "```",
                          *result["outcomes"], "```"]
                lines += _failure("tests", result) if "error" in result else []
            continue
        images = f" at {size['image_size']} x {size['image_size']}" if name != "state" else ""
        envs = f"{size['n_envs']} {size['sim_backend'].upper()}-simulated env{'s' if size['n_envs'] > 1 else ''}"
        lines += ["", f"## {task}, {TITLES[name]}{images}, {envs} ({state.get('status', 'waiting')})", ""]
        results, problems = state.get("results", {}), []
        if "env" not in results:  # not started (the heading says why)
            continue
        if "error" in results["env"] or "skipped" in results["env"]:
            lines += _failure("env", results["env"])
            continue
        lines += [f"Env built in {results['env']['seconds']} s; observations {results['env']['observation_space']}.", ""]
        memory = "peak GPU memory (torch / device in use)" if size["device"] == "cuda" else "peak process memory"
        lines += [f"| run | rollout env steps/s | training env steps/s | total env steps/s | {memory} |",
                  "|---|---:|---:|---:|---:|"]
        for case in CASES:
            result = results.get(case)
            if result is None or "error" in result or "skipped" in result:
                problems += _failure(case, result) if result else []
                continue
            gib = (f"{result['torch_peak_gib']:.1f} / {result['device_used_gib']:.1f} GiB" if "torch_peak_gib" in result
                   else f"{result['process_peak_gib']:.1f} GiB")
            lines.append(f"| {case} + {result['policy']} | {_number(result['rollout_steps_per_s'])} | "
                         f"{_number(result['train_steps_per_s'])} | {_number(result['total_steps_per_s'])} | {gib} |")
        lines += ["", f"ElmurPPO's acting step, every env ({size['n_envs']}):", "",
                  "| acting | ms per step | env steps/s | warm-up (compiling) s |", "|---|---:|---:|---:|"]
        for variant in ACTING:
            result = results.get(f"acting: {variant}")
            if result is None or "error" in result or "skipped" in result:
                problems += _failure(f"acting: {variant}", result) if result else []
                continue
            lines.append(f"| {variant} | {result['ms_per_step']:.2f} | {_number(result['env_steps_per_s'])} | "
                         f"{result['warm_up_s']:.1f} |")
        if "acting" in results:
            problems += _failure("acting", results["acting"])
        lines += ["", *problems] if problems else []
    return "\n".join(lines) + "\n"


def _device_line(dry_run: bool) -> str:
    import importlib.metadata as metadata

    versions = []
    for package in ("mani-skill", "sapien", "mikasa-robo-suite"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    if dry_run or not torch.cuda.is_available():
        device = f"CPU ({platform.machine()}, {os.cpu_count()} CPUs; dry run: CPU simulation)"
    else:
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                  f"{os.cpu_count()} CPUs")
    return f"{device}; torch {torch.__version__}, {', '.join(versions)}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.md", help="Report (Markdown; JSON beside it).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    parser.add_argument("--budget", type=float, default=450.0, help="Seconds for all sections together.")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="Sections to run.")
    parser.add_argument("--task", default="RememberColor3-v0", help="MIKASA-Robo (or ManiSkill) task of the training "
                        "sections.")
    parser.add_argument("--dry-run", action="store_true", help="The same code on the CPU, tiny: CPU simulation, one env, "
                        "36 x 36 images, rollouts of 8 steps, compiling without code generation.")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    torch.set_num_threads(1)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("this check needs a CUDA device; --dry-run runs its code on the CPU")
    size, start = sizes(args.dry_run), time.time()
    command = " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]])
    sections: Dict[str, Dict[str, Any]] = {name: {} for name in args.sections}
    share = sum(SHARES[name] for name in args.sections)
    origin = f"code {code_commit(REPO)}, {date.today().isoformat()}; {_device_line(args.dry_run)}"

    def write(status: str) -> None:
        header = [f"# GPU check{' (dry run)' if args.dry_run else ''}", "",
                  f"Command: `{command}` ({origin}). "
                  f"Budget {args.budget:.0f} s, {status} after {time.time() - start:.0f} s. Env steps/s: the second "
                  "of two iterations (rollout, update; the first warms up); acting: the mean of 50 steps after two "
                  "segments of warm-up" + ("; dry run: the compiled steps traced by dynamo with its eager backend, no "
                                          "code generated." if args.dry_run else ".")]
        write_text_atomically(out, render(header, sections, size, args.task))
        write_json_atomically(out.with_suffix(".json"), {"command": command, "size": size, "sections": sections})

    write("running")
    for name in args.sections:
        budget = min(args.budget * SHARES[name] / share, args.budget - (time.time() - start))
        sections[name]["status"] = "running"
        write("running")
        if budget < PART_MINIMUM_S:
            sections[name] = {"status": f"skipped: out of time ({budget:.0f} s left)"}
            continue
        if name == "tests":
            result = run_tests(budget)
            sections[name] = {"status": "failed" if "error" in result else "passed", "result": result}
            continue
        results_path = out.with_name(f".{out.stem}.{name.replace('+', '_')}.json")
        section_end = time.time() + budget
        # The section stops starting parts a little before its end, so that what it did is saved before a kill.
        process = mp.get_context("spawn").Process(
            target=run_section, args=(name, args.task, size, section_end - 5, str(results_path)))
        process.start()
        while process.is_alive() and time.time() < section_end:
            process.join(min(10.0, max(0.1, section_end - time.time())))
            if results_path.exists():
                sections[name]["results"] = json.loads(results_path.read_text())
                write("running")
        timed_out = process.is_alive()
        if timed_out:
            process.kill()
            process.join()
        sections[name]["results"] = json.loads(results_path.read_text()) if results_path.exists() else {}
        results_path.unlink(missing_ok=True)
        failed = timed_out or process.exitcode != 0 or any(
            "error" in part or "skipped" in part for part in sections[name]["results"].values())
        sections[name]["status"] = (f"timed out after {budget:.0f} s" if timed_out else "failed" if failed else "passed")
        if process.exitcode not in (0, None) and not timed_out:
            sections[name]["status"] += f", exit code {process.exitcode}"
    write("done")
    print(out.read_text())
    if any(not section.get("status", "").startswith("passed") for section in sections.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
