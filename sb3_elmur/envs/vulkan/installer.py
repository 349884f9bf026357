"""The install folder of the private lavapipe: where it is, what a complete install holds (a manifest, the ICD file,
the driver and the libraries it needs, each a whole ELF file), and :func:`install`, which puts it together from
the packages apt downloads."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, ContextManager, Optional, Union

from sb3_elmur.common.utils import staging_folder
from sb3_elmur.envs.vulkan.apt import _PACKAGE, _needed_packages, _os_codename, _private_sources, _PrivateApt, _run
from sb3_elmur.envs.vulkan.elf import _elf_dynamic, _elf_problem, _preload_order

# Folder used when none is given: this variable, else ``~/.cache/sb3_elmur/lavapipe``
DIR_ENV_VAR = "SB3_ELMUR_VULKAN_DIR"
DEFAULT_DIR = Path("~/.cache/sb3_elmur/lavapipe")
# An install: lib/ (the driver and the private libraries it needs), the ICD file naming the driver, the manifest
_DRIVER = "libvulkan_lvp.so"
_MANIFEST = "manifest.json"
_ICD = "lvp_icd.json"
_LIB = "lib"

PathLike = Union[str, "os.PathLike[str]"]


def default_dir() -> Path:
    """
    :return: the folder used when none is given (``$SB3_ELMUR_VULKAN_DIR`` or ``~/.cache/sb3_elmur/lavapipe``)
    """
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULT_DIR).expanduser()


def _resolve_dir(folder: Optional[PathLike]) -> Path:
    return Path(folder).expanduser().resolve() if folder is not None else default_dir().resolve()


def _read_manifest(folder: Path) -> Optional[dict]:
    """:return: the manifest of a complete install in ``folder``, else None"""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        icd = json.loads((folder / _ICD).read_text())
    except (OSError, ValueError):
        return None
    lib = folder / _LIB
    driver = lib / _DRIVER
    # The ICD names the driver by absolute path: a moved folder needs a new install
    if icd.get("ICD", {}).get("library_path") != str(driver) or not driver.is_file():
        return None
    if not all((lib / name).is_file() for name in manifest.get("preload", [])):
        return None
    if _damaged_files(folder, manifest):
        return None
    return manifest


def _damaged_files(folder: Path, manifest: dict) -> list[str]:
    """The libraries of the install in ``folder`` that are not whole ELF files, with what is wrong."""
    lib = folder / _LIB
    problems = ((name, _elf_problem(lib / name)) for name in [*manifest.get("preload", []), _DRIVER])
    return [f"{lib / name}: {problem}" for name, problem in problems if problem is not None]


def is_installed(folder: Optional[PathLike] = None) -> bool:
    """
    :param folder: install folder (default: :func:`default_dir`)
    :return: whether ``folder`` holds a complete install
    """
    return _read_manifest(_resolve_dir(folder)) is not None


def _installed_but_damaged(folder: Path) -> list[str]:
    """The damaged libraries of a complete-looking install in ``folder`` (empty if none or no install)."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return _damaged_files(folder, manifest) if isinstance(manifest, dict) else []


def _check_replaceable(folder: Path) -> None:
    # Replace only what is ours (an install whose folder was moved, or that lost files) or an empty folder
    if folder.is_symlink() or not folder.is_dir() or not ((folder / _MANIFEST).is_file() or not any(folder.iterdir())):
        raise RuntimeError(f"{folder} exists and is not a lavapipe install: choose another folder")


def install(folder: Optional[PathLike] = None, verbose: bool = False) -> Path:
    """
    Download Mesa's lavapipe Vulkan driver from Debian's backports and unpack it into ``folder``.

    Nothing is installed on the system: apt runs with its own sources, lists and cache (the mirror is the
    one the machine's apt sources use for its Debian release), and only the packages that a real install
    would add or upgrade are downloaded. Skipped when ``folder`` already holds a complete install; the
    files are put together in a temporary folder beside it and renamed into place when complete.

    :param folder: install folder (default: :func:`default_dir`)
    :param verbose: print what is done to stderr
    :return: the install folder
    :raises RuntimeError: when apt-get or dpkg is missing, no apt source for the Debian release is found,
        or a download fails
    """
    folder = _resolve_dir(folder)
    if _read_manifest(folder) is not None:
        if verbose:
            print(f"lavapipe already installed in {folder}", file=sys.stderr)
        return folder
    if folder.exists() or folder.is_symlink():
        _check_replaceable(folder)
        damaged = _installed_but_damaged(folder)
        if damaged and verbose:
            print(f"the lavapipe install in {folder} is damaged ({'; '.join(damaged)}): reinstalling", file=sys.stderr)
    try:
        # Before any download: an unwritable folder would otherwise end in a raw PermissionError traceback. (This
        # also removes the staging folders of installs that were killed.)
        with _staging(folder):
            pass
    except OSError as error:
        raise RuntimeError(
            f"cannot write the install folder {folder} ({error.strerror or error}): choose a writable one "
            f"(--dir, or ${DIR_ENV_VAR})"
        ) from error
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: installing lavapipe needs Debian's apt and dpkg")
    codename = _os_codename()
    sources = _private_sources(codename)

    def log(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr)

    with _staging(folder) as tmp:
        # mkdtemp makes it private to the user; the install is as readable as any folder made here
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        packages = _install_in(tmp, folder, codename, sources, log)
    log(f"lavapipe {packages[_PACKAGE]} installed in {folder}")
    return folder


def _staging(folder: Path) -> ContextManager[Path]:
    """A staging folder beside ``folder`` (hidden, locked while in use, removed on exit unless renamed into place);
    those of installs that were killed are removed first, and those of earlier versions (``.<name>.<random>``,
    unlocked) once a day old."""
    return staging_folder(folder.parent, f".{folder.name}.staging-", legacy_prefix=f".{folder.name}.")


def _install_in(tmp: Path, folder: Path, codename: str, sources: str, log: Callable[[str], None]) -> dict[str, str]:
    """:func:`install`'s work in the staging folder ``tmp``, renamed to ``folder`` when complete (unless another
    process finished first). :return: the packages installed (name -> version)"""
    apt = _PrivateApt(tmp / "apt", sources)
    log(f"apt-get update ({codename} and {codename}-backports)")
    apt("update", what="apt-get update")
    packages = _needed_packages(apt, codename)
    specs = [f"{name}={version}" for name, version in sorted(packages.items())]
    log("apt-get download " + " ".join(specs))
    debs = tmp / "debs"
    debs.mkdir()
    apt("download", *specs, what="apt-get download", cwd=debs)
    root = tmp / "root"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"unpacking {deb.name}")

    # soname -> file for every unpacked library (symlinks are only aliases of these)
    index: dict[str, Path] = {}
    drivers = []
    for path in sorted(root.rglob("*.so*")):
        if path.is_symlink() or not path.is_file():
            continue
        if path.name == _DRIVER:
            drivers.append(path)
        soname = _elf_dynamic(path)[0]
        if soname:
            index.setdefault(soname, path)
    if not drivers:
        raise RuntimeError(f"{_DRIVER} not found in the downloaded {_PACKAGE} package")
    preload = _preload_order(drivers[0], index)

    lib = tmp / _LIB
    lib.mkdir()
    for soname in preload:
        shutil.copy2(index[soname], lib / soname)
    shutil.copy2(drivers[0], lib / _DRIVER)
    # Keep the API version the package announces for its driver
    package_icd = next(root.rglob("lvp_icd*.json"), None)
    api_version = json.loads(package_icd.read_text())["ICD"]["api_version"] if package_icd else "1.3.0"
    icd = {
        "file_format_version": "1.0.0",
        "ICD": {"library_path": str(folder / _LIB / _DRIVER), "api_version": api_version},
    }
    (tmp / _ICD).write_text(json.dumps(icd, indent=4) + "\n")
    for sub in ("apt", "debs", "root"):
        shutil.rmtree(tmp / sub)
    # The manifest is written last: its presence marks a complete install
    manifest = {"codename": codename, "packages": packages, "preload": preload}
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=4) + "\n")

    if folder.exists() or folder.is_symlink():
        if _read_manifest(folder) is not None:
            # Another process finished first (the staging folder is removed on the way out)
            return packages
        _check_replaceable(folder)
        shutil.rmtree(folder)
    try:
        os.rename(tmp, folder)
    except OSError:
        if _read_manifest(folder) is None:
            raise
    return packages
