"""Check an exported file against the torch step it was made from, over random observations."""

import warnings
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_elmur.common.checks import check_int
from sb3_elmur.export.step import ExportedStep

Runner = Callable[[List[np.ndarray]], List[np.ndarray]]


def file_runner(path: Union[str, Path], format: str, input_names: Sequence[str], threads: int = 1) -> Runner:
    """A function that runs the exported file on positional numpy inputs and returns its outputs as numpy arrays.

    :param path: the file
    :param format: "onnx" (run by onnxruntime) or "torchscript" (``torch.jit.load``)
    :param input_names: the inputs' names, in order (ONNX feeds them by name)
    :param threads: onnxruntime's intra-op threads
    """
    if format == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda inputs: session.run(None, dict(zip(input_names, inputs)))
    with warnings.catch_warnings():  # TorchScript is deprecated in torch (docs/export.md), not removed
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        module = th.jit.load(str(path))

    def run(inputs: List[np.ndarray]) -> List[np.ndarray]:
        with th.no_grad():
            return [out.numpy() for out in module(*(th.as_tensor(x) for x in inputs))]

    return run


def random_observations(space: spaces.Space, batch_size: int, rng: np.random.Generator,
                        channels_last: Sequence[str] = ()) -> List[np.ndarray]:
    """``batch_size`` random observations of ``space``, as the exported step's observation inputs (in order)."""
    items = list(space.spaces.items()) if isinstance(space, spaces.Dict) else [(None, space)]
    arrays = []
    for key, sub in items:
        sub.seed(int(rng.integers(2**31)))
        array = np.stack([np.asarray(sub.sample(), dtype=sub.dtype) for _ in range(batch_size)])
        if ("obs" if key is None else f"obs.{key}") in channels_last:
            array = np.ascontiguousarray(np.moveaxis(array, 1, -1))
        arrays.append(array)
    return arrays


def compare_with_torch(step: ExportedStep, run: Runner, n_steps: int, batch_size: int = 3,
                       seed: int = 0) -> Dict[str, float]:
    """Run the torch step and the exported file side by side for ``n_steps`` steps of ``batch_size`` rows, each fed
    its own state back, on random observations; every row starts an episode at the first step, row 0 again halfway.

    :return: the largest absolute difference of the actions, the values and the state outputs over all steps
    """
    n_steps, batch_size = check_int("n_steps", n_steps), check_int("batch_size", batch_size)
    rng = np.random.default_rng(seed)
    specs = step.input_specs()
    n_obs = len(step.obs_names)
    torch_inputs = [x.numpy() for x in step.example_inputs(batch_size)]
    file_inputs = list(torch_inputs)
    largest = {"action": 0.0, "value": 0.0, "state": 0.0}
    for t in range(n_steps):
        observations = random_observations(step.policy.observation_space, batch_size, rng, step.channels_last)
        starts = np.full(batch_size, t == 0)
        starts[0] |= t == n_steps // 2
        extra = [starts]
        if specs[-1].name == "noise":
            extra.append(rng.random((batch_size, step.noise_size), dtype=np.float32))
        n_state = len(specs) - n_obs - len(extra)
        torch_inputs = observations + torch_inputs[n_obs: n_obs + n_state] + extra
        file_inputs = observations + file_inputs[n_obs: n_obs + n_state] + extra
        with th.no_grad():
            expected = [out.numpy() for out in step(*(th.as_tensor(x) for x in torch_inputs))]
        got = run(file_inputs)
        for name, a, b in zip(["action", "value"] + ["state"] * n_state, expected, got):
            difference = np.abs(a.astype(np.float64) - b.astype(np.float64))
            largest[name] = max(largest[name], float(difference.max()) if difference.size else 0.0)
        torch_inputs[n_obs: n_obs + n_state] = expected[2:]
        file_inputs[n_obs: n_obs + n_state] = got[2:]
    return largest
