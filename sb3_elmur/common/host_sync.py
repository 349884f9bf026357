"""Host syncs: the calls that make the host wait for a GPU, and a way to count them on any machine.

On a GPU, the host queues work and goes on; it waits for the device to finish everything queued before when it reads a
value back (``bool(t)``, ``t.item()``, ``t.tolist()``, ``t.cpu()``), when an operation's output size depends on
values (``t.nonzero()``, indexing with a bool mask) and when it copies host data to the device (``torch.as_tensor(
array, device="cuda")``, indexing with a list). In a rollout step each such wait costs the latency of the whole queue.
On the CPU the same calls cost next to nothing, and some code paths take them on purpose: testing whether any env
starts an episode, for instance, skips masking work at most steps (``ElmurModel.step_branches``).

So code that runs on either picks its path with :func:`is_accelerated`; :func:`emulate_accelerator` makes the CPU
take the accelerator's paths, and :class:`HostSyncCounter` records every call that would make a GPU wait. Together
they let a test on a machine without a GPU count the host syncs of a rollout step (``tests/test_host_syncs.py``).
``torch.cuda.set_sync_debug_mode`` does this on CUDA only.
"""

import contextlib
import os
import sys
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

_emulated = False


def is_accelerated(device: Union[torch.device, str]) -> bool:
    """Whether code on ``device`` should take the paths without host syncs: a device other than the CPU (a GPU), or
    the CPU inside :func:`emulate_accelerator`.

    :param device: where the tensors live
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    return _emulated or device.type != "cpu"


@contextlib.contextmanager
def emulate_accelerator() -> Iterator[None]:
    """Inside the block, :func:`is_accelerated` says True for the CPU too: the code takes the paths it takes on a GPU
    (same results, more operator calls), so that :class:`HostSyncCounter` can count their host syncs on a CPU. Not
    thread-safe (one process-wide flag)."""
    global _emulated
    before, _emulated = _emulated, True
    try:
        yield
    finally:
        _emulated = before


class HostSync(NamedTuple):
    """One call that makes the host wait for the device: what it is and who made it."""

    kind: str  # e.g. "Tensor.item", "torch.as_tensor of host data", "Tensor.__getitem__ with a bool mask"
    function: str  # the function that made the call (the nearest caller outside torch)
    location: str  # its file and line


# Reads of values on the host. ``Tensor.numpy`` and ``np.asarray(tensor)`` are not among them: on a GPU they refuse a
# device tensor, so the sync is where the tensor came to the host (``.cpu()``, ``.to("cpu")``), which is counted.
_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__", "cpu"}
# Operations whose output size depends on the values: the host reads that size.
_SIZED_BY_VALUES = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
# Tensors made from host data: a copy from the host when they go to the device.
_FROM_HOST = {"as_tensor", "asarray", "tensor"}
_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}
_TORCH_DIR = os.path.dirname(torch.__file__)


def _index_kind(index: Any) -> Optional[str]:
    """Why indexing with ``index`` waits for the device (None: it does not)."""
    if isinstance(index, tuple):
        return next((kind for kind in map(_index_kind, index) if kind is not None), None)
    if isinstance(index, torch.Tensor):
        return "a bool mask" if index.dtype == torch.bool else None
    if isinstance(index, list) or (isinstance(index, np.ndarray) and index.ndim > 0):
        return "a host index (list or array)"
    return None


def _to_the_cpu(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its target."""
    targets = list(args[1:2]) + [kwargs.get("device")]
    for target in targets:
        if isinstance(target, torch.Tensor):
            target = target.device
        if isinstance(target, (str, torch.device)):
            try:
                if torch.device(target).type == "cpu":
                    return True
            except RuntimeError:  # a dtype given by name is not a device
                continue
    return False


def sync_kind(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    """What kind of host sync the call ``func(*args, **kwargs)`` makes on a GPU, or None if it makes none.

    :param func: a torch function or Tensor method, as a ``TorchFunctionMode`` sees it
    :param args: its positional arguments (for a method, the tensor first)
    :param kwargs: its keyword arguments
    """
    name = getattr(func, "__name__", "")
    if name in _READS:
        return f"Tensor.{name}"
    if name in _SIZED_BY_VALUES or (name == "where" and len(args) + len(kwargs) == 1):
        return f"{name} (output sized by values)"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
            return "repeat_interleave (output sized by values)"
    if name == "to" and _to_the_cpu(args, kwargs):
        return "Tensor.to the CPU"
    if name in _FROM_HOST or name == "new_tensor":
        data = args[1 if name == "new_tensor" else 0] if len(args) > (name == "new_tensor") else kwargs.get("data")
        if data is not None and not isinstance(data, torch.Tensor):
            return f"torch.{name} of host data"
    if name in _INDEXING and len(args) > 1:
        kind = _index_kind(args[1])
        if kind is not None:
            return f"Tensor.{name} with {kind}"
    return None


def _caller() -> Tuple[str, str]:
    """The function and file:line of the nearest frame outside torch and this module."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?", "?"
    return frame.f_code.co_name, f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


class HostSyncCounter(TorchFunctionMode):
    """Inside ``with HostSyncCounter() as counter:``, every torch call made from Python that would make the host wait
    for a GPU (:func:`sync_kind`) is appended to ``counter.syncs``, on any device, CPU included.

    It sees what Python calls: reads of values, operations sized by values, indexing with masks or host indices,
    tensors made from host data. On a CPU, where every tensor is a host tensor, ``.to(device)`` with the CPU as its
    target counts even where it moves nothing (on a GPU it would not), and a host tensor moved to the device with
    ``.to(device)`` counts nowhere; nor does it see syncs inside torch's C++ kernels. ``torch.cuda.set_sync_debug_mode``
    sees those, on a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[HostSync] = []

    def __torch_function__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.syncs.append(HostSync(kind, *_caller()))
        return func(*args, **kwargs)
