"""Speed of the bare ELMUR model: acting cost at different episode steps, and training throughput of
segment-parallel processing versus a loop over steps.

    python benchmarks/model_speed.py                      # writes runs/model_speed.md (and .json)

Acting must cost the same per step at episode step 10, 10^3 and 10^5 (the state does not grow). It is timed
through ``model(x, state)`` (what RecurrentPPO's rollouts run, on a state unpacked every step) and through
``model.step`` carrying every layer's outputs of the current segment (what ``evaluate_tmaze`` runs).
Before/after comparisons of the acting path: ``benchmarks/acting_speed.py``.
"""

import argparse
import platform
import time

import torch

from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.memory import ElmurState
from sb3_elmur.common.model import ElmurModel
from sb3_elmur.common.utils import new_report_path, write_json_atomically, write_text_atomically


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def advance(model: ElmurModel, batch: int, episode_step: int) -> ElmurState:
    """The state of ``batch`` rows after ``episode_step`` random steps, run segment-parallel in chunks of at most
    10^5 row-steps (10^6 at once peaked at 3.4 GB)."""
    state = model.initial_state(batch)
    chunk_steps = max(model.config.context_length, min(10_000, 100_000 // batch))
    with torch.no_grad():
        done = 0
        while done < episode_step:
            chunk = min(chunk_steps, episode_step - done)
            _, state = model(torch.randn(batch, chunk, model.input_dim), state)
            done += chunk
    return state


def acting_step_ms(model: ElmurModel, state: ElmurState, repeats: int, carry_outputs: bool) -> float:
    """Milliseconds per acting step, averaged over ``repeats`` consecutive steps from ``state`` on (``carry_outputs``:
    ``model.step`` with the layer outputs, else ``model(x, state)``)."""
    batch = state.step.shape[0]
    with torch.no_grad():
        x, starts, outputs = torch.randn(batch, 1, model.input_dim), torch.zeros(batch, dtype=torch.bool), None
        start = time.perf_counter()
        for _ in range(repeats):  # consecutive steps: every phase of the segment, writes included
            if carry_outputs:
                _, state, outputs = model.step(x[:, 0], state, starts, outputs)
            else:
                _, state = model(x, state)
        return 1e3 * (time.perf_counter() - start) / repeats


def training_step_us(model: ElmurModel, batch: int, length: int, parallel: bool, repeats: int) -> float:
    """Microseconds per (env) step of forward + backward over [batch, length] sequences."""
    x = torch.randn(batch, length, model.input_dim)

    def run() -> None:
        model.zero_grad()
        state = model.initial_state(batch)
        if parallel:
            out, _ = model(x, state)
        else:
            outs = []
            for t in range(length):
                o, state = model(x[:, t : t + 1], state)
                outs.append(o)
            out = torch.cat(outs, dim=1)
        out.square().mean().backward()

    return 1e6 * _time(run, repeats) / (batch * length)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/model_speed.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/model_speed.md",
                        help="Markdown report to write, and a .json beside it.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing report (else refused; the committed one is "
                             "benchmarks/results/model_speed.md).")
    parser.add_argument("--repeats", type=int, default=200, help="Timed calls per measurement.")
    args = parser.parse_args()
    out = new_report_path(parser, args.out, args.overwrite)
    new_report_path(parser, out.with_suffix(".json"), args.overwrite)
    torch.set_num_threads(1)  # small models on CPU: more threads only add overhead
    torch.manual_seed(0)
    config = ElmurConfig(d_model=64, n_layers=2, n_heads=2, memory_size=2, context_length=10)
    model = ElmurModel(16, config).eval()

    acting, begin = {}, time.perf_counter()
    print("acting: ms per step, `model(x, state)` / `model.step` (the state is first advanced to the step; batch 100 "
          "to step 100,000 takes a few minutes)", flush=True)
    for batch in (1, 100):
        for step in (10, 1_000, 100_000):
            state = advance(model, batch, step)
            key = f"batch {batch}, step {step}"
            acting[key] = [acting_step_ms(model, state, args.repeats, carry_outputs) for carry_outputs in (False, True)]
            print(f"  {key}: {acting[key][0]:.3f} / {acting[key][1]:.3f}  ({time.perf_counter() - begin:.0f} s)",
                  flush=True)
    model.train()
    training = {}
    for mode in ("segment-parallel", "step loop"):
        training[mode] = training_step_us(model, batch=8, length=128, parallel=(mode == "segment-parallel"), repeats=5)
        print(f"training, {mode}: {training[mode]:.1f} us per env step  ({time.perf_counter() - begin:.0f} s)",
              flush=True)
    results = {
        "config": vars(config),
        "input_dim": 16,
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
        "acting_ms_per_step": acting,
        "training_us_per_step": training,
        "training_speedup": training["step loop"] / training["segment-parallel"],
    }
    lines = [
        "# ELMUR model speed",
        "",
        f"Command: `python benchmarks/model_speed.py --out {args.out}` ({results['machine']}).",
        "Config: d_model 64, 2 layers, 2 heads, 2 slots, context 10, input 16.",
        "",
        "| acting (mean over consecutive single steps, no grad) | `model(x, state)`, ms per step | "
        "`model.step` with layer outputs, ms per step |",
        "|---|---|---|",
        *[f"| {k} | {v[0]:.3f} | {v[1]:.3f} |" for k, v in acting.items()],
        "",
        "| training, forward + backward over 8 x 128 steps | us per env step |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in training.items()],
        "",
        f"Segment-parallel training is {results['training_speedup']:.1f}x faster than the step loop.",
        "",
        "Acting before/after the acting speed-ups, as ratios within one run: `benchmarks/results/acting_speed.md`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, text)
    write_json_atomically(out.with_suffix(".json"), results)


if __name__ == "__main__":
    main()
