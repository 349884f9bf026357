"""Making the private lavapipe the Vulkan driver of the current process (unless the system has one of its own), and
checking that ManiSkill then runs."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from sb3_elmur.envs.vulkan.installer import _DRIVER, _ICD, _LIB, PathLike, _read_manifest, _resolve_dir

# Keep the libraries loaded for the life of the process
_loaded: list = []


def _system_has_vulkan() -> bool:
    """
    Whether the system has a Vulkan driver of its own for a real device (or the user chose one).
    """
    if os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES"):
        return True
    # SAPIEN itself uses this test for an NVIDIA GPU
    if shutil.which("nvidia-smi"):
        try:
            result = subprocess.run(["nvidia-smi"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            if result.returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    # Another GPU: a render node and a driver that is not the (possibly too old) system lavapipe
    dri = Path("/dev/dri")
    if not dri.is_dir() or not any(dri.glob("renderD*")):
        return False
    for icd_dir in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"):
        path = Path(icd_dir)
        if path.is_dir() and any(p.suffix == ".json" and not p.name.startswith("lvp") for p in path.iterdir()):
            return True
    return False


def activate(folder: Optional[PathLike] = None, force: bool = False) -> bool:
    """
    Make the private lavapipe the Vulkan driver of the current process.

    Call it before the first SAPIEN / ManiSkill env is created. It sets ``VK_ICD_FILENAMES`` (and
    ``VK_DRIVER_FILES``) and loads the private libraries the driver needs: ``LD_LIBRARY_PATH`` is read
    once at process start, so they are loaded here, globally and in dependency order, and the driver
    then finds them already loaded. Child processes inherit the variables and call this again.

    :param folder: install folder (default: :func:`default_dir`)
    :param force: use lavapipe even when the system seems to have a Vulkan device of its own
    :return: True when Vulkan should work (the system's own, or lavapipe now active), False when
        ``folder`` holds no complete install
    """
    folder = _resolve_dir(folder)
    icd = str(folder / _ICD)
    # Set by this function in this process, or inherited from a parent that activated it
    ours = os.environ.get("VK_ICD_FILENAMES") == icd
    if ours and _loaded:
        return True
    if not force and not ours and _system_has_vulkan():
        return True
    manifest = _read_manifest(folder)
    if manifest is None:
        return False
    try:
        for soname in manifest["preload"]:
            _loaded.append(ctypes.CDLL(str(folder / _LIB / soname), mode=ctypes.RTLD_GLOBAL))
        # Load the driver too: a library missing from the system shows here, not as a bare
        # "ErrorIncompatibleDriver" from the Vulkan loader later
        _loaded.append(ctypes.CDLL(str(folder / _LIB / _DRIVER)))
    except OSError as e:
        raise RuntimeError(
            f"the lavapipe driver in {folder} cannot be loaded ({e}): delete the folder and install again"
        ) from e
    os.environ["VK_ICD_FILENAMES"] = icd
    os.environ["VK_DRIVER_FILES"] = icd
    return True


def check(folder: Optional[PathLike] = None, env_id: str = "PickCube-v1") -> Optional[str]:
    """
    Activate, then create a ManiSkill env on the CPU backend, reset it and step it once.

    :param folder: install folder (default: :func:`default_dir`)
    :param env_id: ManiSkill env to try
    :return: None when it worked, else the reason it did not
    """
    if not activate(folder):
        return f"lavapipe is not installed in {_resolve_dir(folder)}: run `python -m sb3_elmur.envs.vulkan install`"
    try:
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the envs)
    except ImportError as e:
        return f"ManiSkill is not importable ({e}): pip install mani-skill"
    try:
        env = gym.make(env_id, num_envs=1, obs_mode="state", sim_backend="cpu")
        try:
            env.reset(seed=0)
            env.step(env.action_space.sample())
        finally:
            env.close()
    except Exception as e:  # noqa: BLE001  (any failure is the answer)
        return f"{env_id} failed: {type(e).__name__}: {e}"
    return None
