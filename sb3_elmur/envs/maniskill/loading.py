"""Importing ManiSkill and MIKASA-Robo: with a Vulkan device activated first, and their warnings about its fallbacks
(printed in every process) replaced by one line in the main process that says what is used."""

import logging
import multiprocessing as mp
import os
import sys
import warnings
from pathlib import Path

import torch as th

from sb3_elmur.envs import vulkan
from sb3_elmur.envs.vulkan.installer import _ICD, _resolve_dir

# What SAPIEN (at import) and ManiSkill (at every env's creation) say, in every process, about their fallbacks: no
# system libvulkan (SAPIEN's own loader is used), no CUDA device (rendering on the CPU). Both are expected where
# lavapipe is the Vulkan driver; :func:`_say_what_is_used` says it once instead.
_SAPIEN_LOADER_WARNING = r"Failed to find system libvulkan"
_CUDA_RENDER_FALLBACK = "CUDA device was not found"
_said_what_is_used = False


class _HideRenderFallback(logging.Filter):
    """Drops ManiSkill's log message that rendering falls back to the CPU (said once by :func:`_say_what_is_used`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _CUDA_RENDER_FALLBACK not in record.getMessage()


def _say_what_is_used(vulkan_found: bool) -> None:
    """Say (once, on stderr, in the main process only: workers stay silent) which Vulkan driver and loader ManiSkill
    uses and where it renders.

    :param vulkan_found: what ``vulkan.activate`` returned (False: neither lavapipe nor a driver of the system)
    """
    global _said_what_is_used
    if _said_what_is_used or mp.parent_process() is not None:
        return
    _said_what_is_used = True
    icd = os.environ.get("VK_ICD_FILENAMES")
    lavapipe = _resolve_dir(None) / _ICD
    if not vulkan_found:
        driver = "no Vulkan driver (install one: python -m sb3_elmur.envs.vulkan install)"
    elif icd is not None and Path(icd) == lavapipe:
        driver = f"lavapipe (CPU Vulkan) from {lavapipe.parent}"
    elif icd:
        driver = f"the Vulkan driver of VK_ICD_FILENAMES={icd}"
    else:
        driver = "the system's Vulkan driver"
    loader = "SAPIEN's own Vulkan loader" if os.environ.get("SAPIEN_VULKAN_LIBRARY_PATH") else "the system's libvulkan"
    render = "on the GPU" if th.cuda.is_available() else "on the CPU (no CUDA device)"
    print(f"sb3_elmur: ManiSkill uses {driver}, {loader}, rendering {render}", file=sys.stderr, flush=True)


def _import_maniskill() -> None:
    """Import ManiSkill (registering its task ids) with a usable Vulkan device, its fallback warnings hidden and
    what is used said once (:func:`_say_what_is_used`)."""
    vulkan_found = vulkan.activate()
    # Before SAPIEN's import, which warns; a filter of this one message only, for the life of the process.
    warnings.filterwarnings("ignore", message=_SAPIEN_LOADER_WARNING, category=UserWarning, module=r"sapien\.")
    try:
        import mani_skill.envs  # noqa: F401
    except ImportError as error:
        raise ImportError("ManiSkill tasks need the mani-skill package: pip install -e '.[maniskill]'") from error
    from mani_skill.utils.logging_utils import logger

    if not any(isinstance(f, _HideRenderFallback) for f in logger.filters):
        logger.addFilter(_HideRenderFallback())
    _say_what_is_used(vulkan_found)


def _import_mikasa() -> None:
    _import_maniskill()
    try:
        import mikasa_robo_suite.rl.memory_envs  # noqa: F401  (registers the task ids)
    except ImportError as error:
        raise ImportError(
            "MIKASA-Robo tasks need the mikasa-robo-suite package, installed without its dependencies (they pin "
            "an old torch): pip install -e '.[maniskill]' && pip install --no-deps mikasa-robo-suite==1.0.0"
        ) from error
