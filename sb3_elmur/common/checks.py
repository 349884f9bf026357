"""Argument checks shared by the package: a clear error that names the argument, before any work."""

import math
import numbers
import os
from typing import Any, Optional

import numpy as np
import torch


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer argument: any integral number (a numpy integer too, but not a bool) >= ``minimum``.

    :param name: name of the argument, for the error message
    :param value: the value to check
    :param minimum: smallest allowed value
    :return: ``value`` as a plain ``int``
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """Validate a float argument: any finite real number (a numpy float too, but not a bool).

    :param name: name of the argument, for the error message
    :param value: the value to check
    :return: ``value`` as a plain ``float``
    """
    # A non-finite hyper-parameter (inf std, nan dropout) only shows up later as NaN outputs: refuse it here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class InsufficientMemoryError(MemoryError, ValueError):
    """A size argument asks for more memory than the machine has: refused before allocating, where the allocation
    would end in an out-of-memory kill or a bare allocator error. A ValueError too (the argument is the cause)."""


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in decimal units (kB, MB, GB, ...), for messages."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def available_memory_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Memory available for new tensors on ``device``: the free memory of a CUDA device; on CPU, the kernel's
    estimate of available RAM (``MemAvailable`` of /proc/meminfo, Linux), else the physical RAM (``os.sysconf``).

    :param device: where the tensors go (None: CPU)
    :return: bytes, or None where it cannot be told
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):  # no CUDA, or no such device: the move fails by itself
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(n_bytes: int, what: str, advice: str, device: Optional[torch.device] = None) -> None:
    """Refuse an allocation of about ``n_bytes`` that cannot fit, before it is tried.

    :param n_bytes: the estimated need
    :param what: what needs it and why, for the message (names the arguments that set the size)
    :param advice: what to change, for the message
    :param device: where it would be allocated (None: CPU)
    :raises InsufficientMemoryError: ``n_bytes`` is more than :func:`available_memory_bytes` of ``device``
    """
    available = available_memory_bytes(device)
    if available is not None and n_bytes > available:
        where = "RAM" if device is None or torch.device(device).type == "cpu" else f"free memory on {device}"
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(n_bytes)}, more than the {format_bytes(available)} of {where} "
            f"available: {advice}"
        )


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean argument: True or False (a numpy bool too).

    :param name: name of the argument, for the error message
    :param value: the value to check
    :return: ``value`` as a plain ``bool``
    """
    # A string such as "False" or "no" (from a config file or a command line) would silently count as True.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_max_grad_norm(value: Any, name: str = "max_grad_norm") -> float:
    """Validate a gradient-clipping norm: a finite number > 0.

    :param value: the value to check
    :param name: name of the argument, for the error message
    :return: ``value`` as a plain ``float``
    """
    # torch's clip_grad_norm_ scales the gradient by max_norm / norm: a negative norm turns descent into ascent,
    # 0 zeroes every gradient (no learning). Neither is an error there.
    value = check_float(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0 (the largest gradient norm kept), got {value!r}")
    return value



def check_device(device: Any, what: str = "device") -> None:
    """Refuse a CUDA device this machine does not have: SB3's ``get_device`` falls back to the CPU without a word,
    so ``--device cuda:7`` on a machine without it would train on the CPU, silently, many times slower.

    :param device: a torch device or its name ("auto", "cpu", "cuda", "cuda:1", ...)
    :param what: the argument's name, for the message
    :raises ValueError: a device that torch does not know, or a CUDA device that is not there
    """
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what} {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:0', 'auto')") from error
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {device!r} asks for CUDA, which is not available on this machine: use 'cpu' (or 'auto')")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )


class RecurrentStateError(ValueError):
    """A recurrent state that this policy cannot have made: another model's, another size, another batch."""


class NonFiniteError(FloatingPointError):
    """NaN or inf values where the policy needs finite ones: a gradient that reached the optimizer (the update was
    skipped, the parameters are unchanged), or an observation (refused before the policy reads it)."""


def finite_flag(observation: Any) -> Optional[torch.Tensor]:
    """Whether every float entry of a batch of observations (tensors, or a dict of them) is finite, as a bool tensor
    on their device: no value is read on the host, so a GPU does not wait (see ``host_sync``).

    :param observation: a batch of observations as tensors (or a dict of them); integer ones pass
    :return: a 0-dim bool tensor, or None if no entry is a float tensor
    """
    parts = observation.values() if isinstance(observation, dict) else [observation]
    flags = [torch.isfinite(value).all() for value in parts if torch.is_floating_point(value)]
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def check_finite_observation(observation: Any, context: str) -> None:
    """Refuse an observation that holds NaN or inf, naming where: otherwise it only shows up deep in torch, as
    "Expected parameter logits ... to satisfy the constraint" from the action distribution.

    :param observation: a batch of observations (numpy arrays or tensors, or a dict of them); integer ones pass
    :param context: who read it, for the message (e.g. "ElmurPolicy.predict")
    :raises NonFiniteError: some entry is NaN or inf
    """
    parts = observation.items() if isinstance(observation, dict) else [(None, observation)]
    for key, value in parts:
        if isinstance(value, torch.Tensor):
            # One reduction (and, on GPU, one sync) per call: an acting step costs much more (measured 0.4%).
            finite = finite_flag(value)
            if finite is None or bool(finite):
                continue
            value = value.detach().cpu().numpy()
        else:
            value = np.asarray(value)
            if not np.issubdtype(value.dtype, np.floating) or np.isfinite(value).all():
                continue
        bad = np.argwhere(~np.isfinite(value))
        index = tuple(int(i) for i in bad[0])
        name = "observation" if key is None else f"observation[{key!r}]"
        raise NonFiniteError(
            f"{context}: {name} holds {len(bad)} NaN or inf value(s), the first {float(value[index])!r} at index "
            f"{list(index)} (of shape {list(value.shape)}; for a batch the first index is the env). A policy cannot "
            "act on it: fix the env, or wrap it in stable_baselines3.common.vec_env.VecCheckNan(env, "
            "raise_exception=True) to find the step that produces it."
        )
