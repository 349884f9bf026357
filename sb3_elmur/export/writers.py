"""Writing an :class:`~sb3_elmur.export.step.ExportedStep` as an ONNX or a TorchScript file, with its description."""

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch as th

from sb3_elmur.common.checks import check_int
from sb3_elmur.common.policies import ElmurPolicy
from sb3_elmur.common.utils import write_atomically
from sb3_elmur.export.loading import load_elmur_policy
from sb3_elmur.export.step import ExportedStep
from sb3_elmur.export.verify import compare_with_torch, file_runner

FORMATS = ("onnx", "torchscript")
# The key of the description in the ONNX file's metadata and the name of the extra file in the TorchScript archive.
METADATA_KEY = "sb3_elmur.export"
# Version of the input/output layout that the runner reads (bumped if names or meanings change).
LAYOUT_VERSION = 1
# ONNX opset of the files: 18 is read by every onnxruntime since 1.14.
OPSET = 18
# Largest difference from the torch step that the export's check accepts (float32 sums in another order: ~1e-6).
CHECK_TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """An exported file that does not compute what the policy's torch step computes (a translation fault)."""


def _onnx_searchsorted(sorted_sequence: Any, self: Any, out_int32: bool = False, right: bool = False,
                       side: Any = None, sorter: Any = None) -> Any:
    """``torch.searchsorted`` of a sorted 1-D sequence (DistanceBias's log buckets), which torch's ONNX exporter does not
    translate: the count of entries below (``right``: up to) each value, as one broadcast comparison and a sum."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    value = op.Unsqueeze(self, op.Constant(value_ints=[-1]))
    hit = op.LessOrEqual(sorted_sequence, value) if right else op.Less(sorted_sequence, value)
    count = op.ReduceSum(op.Cast(hit, to=FLOAT.dtype), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Cast(count, to=INT64.dtype)


def describe(step: ExportedStep, batch_size: Optional[int], source: str) -> Dict[str, Any]:
    """What a file holds, stored in it (``METADATA_KEY``) for the runner and for people: the inputs and outputs with
    their shapes, the action space, whether the action is sampled and from how much noise."""
    space = step.action_space
    action: Dict[str, Any] = {"type": type(space).__name__, "shape": list(space.shape)}
    for name in ("n", "nvec", "low", "high"):
        if hasattr(space, name):
            action[name] = np.asarray(getattr(space, name)).tolist()
    return {
        "layout_version": LAYOUT_VERSION,
        "source": source,
        "policy_class": type(step.policy).__name__,
        "deterministic": step.deterministic,
        "batch_size": batch_size,
        "noise_size": 0 if step.deterministic else step.noise_size,
        "channels_last": sorted(step.channels_last),
        "action_space": action,
        "elmur_config": vars(step.backbones[0][1].config),
        "inputs": [spec.as_dict() for spec in step.input_specs()],
        "outputs": [spec.as_dict() for spec in step.output_specs()],
    }


def _write_onnx(step: ExportedStep, path: Path, batch_size: Optional[int], description: Dict[str, Any],
                check: Callable[[Path], None]) -> None:
    # torch's exporter needs onnx and onnxscript: an ImportError here names the missing one before any work.
    import onnx
    import onnxscript  # noqa: F401

    # A dynamic batch is traced at 2 rows: torch.export specializes sizes 0 and 1.
    inputs = step.example_inputs(batch_size or 2)
    dynamic_shapes = None
    if batch_size is None:
        batch = th.export.Dim("batch")
        dynamic_shapes = (tuple({0: batch} for _ in inputs),)  # one entry: forward takes *inputs
    # The exporter's registry logs a warning for each torchvision operator it cannot register: none is used here.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with th.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's deprecation and tracing notes: nothing for the user
            program = th.onnx.export(
                step, inputs, None, input_names=[spec.name for spec in step.input_specs()],
                output_names=[spec.name for spec in step.output_specs()], opset_version=OPSET, dynamo=True,
                dynamic_shapes=dynamic_shapes, verbose=False, external_data=False,
                custom_translation_table={th.ops.aten.searchsorted.Tensor: _onnx_searchsorted},
            )
    finally:
        registry_log.setLevel(level)
    proto = program.model_proto
    proto.doc_string = f"One acting step of an ELMUR policy ({description['source']}); see sb3_elmur.export"
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        check(tmp)

    write_atomically(path, write)


def _write_torchscript(step: ExportedStep, path: Path, batch_size: Optional[int], description: Dict[str, Any],
                       check: Callable[[Path], None]) -> None:
    with th.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", th.jit.TracerWarning)  # sizes read as Python numbers: constant per model
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")  # docs/export.md: why
        module = th.jit.trace(step, step.example_inputs(batch_size or 2), check_trace=False)
    extra = {METADATA_KEY: json.dumps(description)}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
            th.jit.save(module, str(tmp), _extra_files=extra)
        check(tmp)

    write_atomically(path, write)


def export_policy(
    model: Union[str, Path, ElmurPolicy],
    out: Union[str, Path],
    format: str = "onnx",
    deterministic: bool = True,
    batch_size: Optional[int] = None,
    channels_last: bool = False,
    overwrite: bool = False,
    check_steps: int = 0,
) -> Dict[str, Any]:
    """Export one acting step of an ELMUR policy (see the module ``sb3_elmur.export`` for the inputs and outputs).

    :param model: a model zip saved by RecurrentPPO (ElmurPolicy, CnnElmurPolicy, MultiInputElmurPolicy), ElmurPPO or
        RecurrentBC, or a policy (copied: the caller's stays where and as it is)
    :param out: the file to write (atomically: a failure leaves no partial file)
    :param format: "onnx" or "torchscript"
    :param deterministic: the greedy action (``predict(deterministic=True)``); False: a sample from an input ``noise``
    :param batch_size: rows per call, fixed in the file; None: any number (dynamic). A TorchScript module takes any
        number of rows either way (tracing records sizes as operations)
    :param channels_last: image observations come channel-last (height, width, channels), as from a channel-last
        env, and the graph transposes them as SB3's VecTransposeImage did in training
    :param overwrite: replace ``out`` if it exists
    :param check_steps: before the file takes its place, run it (onnxruntime or ``torch.jit.load``) against the torch
        step for this many steps (:func:`~sb3_elmur.export.verify.compare_with_torch`; 0: no check)
    :return: the description stored in the file, with ``check``: the largest differences found (if checked)
    :raises ValueError: a bad argument, or ``out`` exists and ``overwrite`` is False (named)
    :raises ExportCheckError: the written file differs from the torch step by more than ``CHECK_TOLERANCE`` (the file
        is not kept)
    :raises UnsupportedModelError: the zip holds no ElmurPolicy (see :func:`load_elmur_policy`)
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give the file to write, such as {out / ('policy.' + format[:4])}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists: pass overwrite=True (command line: --overwrite) to replace it")
    if isinstance(model, ElmurPolicy):
        # A copy: the export puts the policy on the CPU in evaluation mode, which the caller's model should not be.
        policy, source = copy.deepcopy(model), type(model).__name__
    else:
        policy, info = load_elmur_policy(model)
        source = Path(info["file"]).name
    step = ExportedStep(policy.to("cpu"), deterministic=deterministic, channels_last=channels_last)
    description = describe(step, batch_size, source)
    check_steps = check_int("check_steps", check_steps, minimum=0)
    differences: Dict[str, float] = {}

    def check(tmp: Path) -> None:
        if not check_steps:
            return
        run = file_runner(tmp, format, [spec.name for spec in step.input_specs()])
        differences.update(compare_with_torch(step, run, check_steps, batch_size=batch_size or 3))
        if max(differences.values()) > CHECK_TOLERANCE:
            raise ExportCheckError(
                f"the exported {format} step differs from the policy's torch step by up to {differences} (tolerance "
                f"{CHECK_TOLERANCE}) over {check_steps} steps: {out} was not written. Please report it, with the model"
            )

    (_write_onnx if format == "onnx" else _write_torchscript)(step, out, batch_size, description, check)
    return {**description, "check": differences} if check_steps else description


def read_description(path: Union[str, Path]) -> Dict[str, Any]:
    """The description stored in an exported file (ONNX or TorchScript), as :func:`describe` made it."""
    path = Path(path)
    if path.suffix == ".onnx" or path.read_bytes()[:2] != b"PK":  # TorchScript archives are zips
        import onnx

        proto = onnx.load_model(str(path), load_external_data=False)
        for entry in proto.metadata_props:
            if entry.key == METADATA_KEY:
                return json.loads(entry.value)
        raise ValueError(f"{path} was not written by sb3_elmur.export (no {METADATA_KEY!r} metadata)")
    extra = {METADATA_KEY: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        th.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_KEY])
