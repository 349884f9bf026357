"""
A private CPU Vulkan driver (Mesa's lavapipe) for SAPIEN / ManiSkill 3 on machines without a GPU.

Every ManiSkill 3 env needs a Vulkan device that SAPIEN accepts, even with state observations.
Debian 12's own lavapipe (Mesa 22.3) is rejected; the Mesa 25 one of ``bookworm-backports`` works.
:func:`install` downloads it with the machine's own ``apt-get`` (private apt state, the mirror taken
from the machine's apt sources) and unpacks it into a folder of its own, so the system is left as it is.
:func:`activate` makes that driver the one the Vulkan loader uses in the current process.

Command line::

    python -m sb3_elmur.envs.vulkan install [--dir DIR]
    python -m sb3_elmur.envs.vulkan check [--dir DIR]

Only the standard library is imported here, so ``activate()`` can run before SAPIEN is imported.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, ContextManager, Optional, Union

from sb3_elmur.common.utils import staging_folder

# Folder used when none is given: this variable, else ``~/.cache/sb3_elmur/lavapipe``
DIR_ENV_VAR = "SB3_ELMUR_VULKAN_DIR"
DEFAULT_DIR = Path("~/.cache/sb3_elmur/lavapipe")

# SAPIEN needs VK_KHR_external_semaphore_fd and descriptorBindingPartiallyBound from lavapipe
MIN_MESA_VERSION = (24, 3)

_PACKAGE = "mesa-vulkan-drivers"
_DRIVER = "libvulkan_lvp.so"
_MANIFEST = "manifest.json"
_ICD = "lvp_icd.json"
_LIB = "lib"
# SAPIEN ships its own Vulkan loader (used when the system has none), so the loader package is not needed
_SKIP_PACKAGES = {"libvulkan1"}
# These cannot be swapped in a running process: a driver that needs newer ones is of no use
_CORE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6"}
# Keep the libraries loaded for the life of the process
_loaded: list = []

PathLike = Union[str, "os.PathLike[str]"]


def default_dir() -> Path:
    """
    :return: the folder used when none is given (``$SB3_ELMUR_VULKAN_DIR`` or ``~/.cache/sb3_elmur/lavapipe``)
    """
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULT_DIR).expanduser()


def _resolve_dir(folder: Optional[PathLike]) -> Path:
    return Path(folder).expanduser().resolve() if folder is not None else default_dir().resolve()


# --- apt sources --------------------------------------------------------------------------------


def _os_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError as e:
        raise RuntimeError(f"cannot read /etc/os-release to find the Debian release: {e}") from e
    fields = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text, flags=re.M))
    codename = fields.get("VERSION_CODENAME")
    if fields.get("ID") != "debian" and "debian" not in fields.get("ID_LIKE", "").split():
        raise RuntimeError(f"this is not Debian (ID={fields.get('ID')!r}): Debian's backports cannot be used here")
    if not codename:
        raise RuntimeError("no VERSION_CODENAME in /etc/os-release: cannot tell which backports suite to use")
    return codename


def _parse_one_line(text: str) -> list[dict]:
    # "deb [opt=val ...] uri suite [component ...]"
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        options = {}
        match = re.match(r"^(\S+)\s+\[([^\]]*)\]\s*(.*)$", line)
        if match:
            kind, opts, rest = match.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[key.lower()] = value
        else:
            kind, _, rest = line.partition(" ")
        words = rest.split()
        if len(words) < 2:
            continue
        entries.append(
            dict(types=[kind], uris=[words[0]], suites=[words[1]], components=words[2:], signed_by=options.get("signed-by"))
        )
    return entries


def _parse_deb822(text: str) -> list[dict]:
    entries = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key is not None:
                # Continuation line (Signed-By may hold an inline key; only a path is of use here)
                fields[key] += "\n" + line.strip()
                continue
            key, sep, value = line.partition(":")
            if not sep:
                key = None
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if not fields.get("uris") or fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by", "").strip()
        entries.append(
            dict(
                types=fields.get("types", "").split(),
                uris=fields["uris"].split(),
                suites=fields.get("suites", "").split(),
                components=fields.get("components", "").split(),
                # An inline key block cannot go into a one-line source: leave it to the system keyrings
                signed_by=signed_by if signed_by and "\n" not in signed_by else None,
            )
        )
    return entries


def _system_sources() -> list[dict]:
    """
    :return: the machine's apt source entries (one-line and deb822 formats), as apt itself reads them
    """
    files = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    entries = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries += _parse_deb822(text) if path.suffix == ".sources" else _parse_one_line(text)
    return entries


def _private_sources(codename: str) -> str:
    """
    Build a sources.list with the machine's own entries for ``codename`` (and its -updates/-security
    suites) plus ``codename-backports`` on the mirror the machine uses for ``codename``.

    :param codename: Debian release, e.g. ``bookworm``
    :return: the text of the private sources.list
    """
    lines: list[str] = []
    backports_uri = None
    for entry in _system_sources():
        if "deb" not in entry["types"]:
            continue
        option = f"[signed-by={entry['signed_by']}] " if entry["signed_by"] else ""
        for uri in entry["uris"]:
            for suite in entry["suites"]:
                if suite != codename and not suite.startswith(codename + "-"):
                    continue
                lines.append(f"deb {option}{uri} {suite} main")
                if suite == codename and backports_uri is None:
                    backports_uri = f"deb {option}{uri} {codename}-backports main"
    if backports_uri is None:
        raise RuntimeError(
            f"no apt source for Debian {codename!r} found in /etc/apt/sources.list or /etc/apt/sources.list.d: "
            "cannot tell which mirror to take the backports from"
        )
    if backports_uri not in lines:
        lines.append(backports_uri)
    # Same entry from several files would make apt warn
    return "\n".join(dict.fromkeys(lines)) + "\n"


def _run(cmd: list[str], what: str, cwd: Optional[Path] = None) -> str:
    try:
        result = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise RuntimeError(f"{what} failed: {e}") from e
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit code {result.returncode}):\n{tail}")
    return result.stdout


def _system_dpkg_status() -> str:
    out = _run(["apt-config", "shell", "STATUS", "Dir::State::status/f"], what="apt-config")
    match = re.search(r"STATUS='([^']*)'", out)
    return match.group(1) if match else "/var/lib/dpkg/status"


class _PrivateApt:
    """apt-get with its own sources, lists and cache under ``state``; dpkg's status stays the system's."""

    def __init__(self, state: Path, sources: str) -> None:
        self.state = state
        for sub in ("lists/partial", "cache/archives/partial", "parts", "preferences.d"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        (state / "sources.list").write_text(sources)
        (state / "preferences").write_text("")
        self.options = []
        for key, value in {
            # The system's dpkg status, so that the simulation sees what is installed. Asked, not assumed,
            # and set explicitly: apt derives it from Dir::State when that is changed and ends in "apt".
            "Dir::State::status": _system_dpkg_status(),
            "Dir::Etc::SourceList": state / "sources.list",
            "Dir::Etc::SourceParts": state / "parts",
            "Dir::Etc::Preferences": state / "preferences",
            "Dir::Etc::PreferencesParts": state / "preferences.d",
            # Dir::State::status is absolute, so the simulation still sees what the system has installed
            "Dir::State": state,
            "Dir::Cache": state / "cache",
            "Acquire::Languages": "none",
            # As root apt downloads as user _apt, which may not be able to write into a home folder
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        }.items():
            if value != "":
                self.options += ["-o", f"{key}={value}"]

    def __call__(self, *args: str, what: str, cwd: Optional[Path] = None) -> str:
        return _run(["apt-get", "-q", *self.options, *args], what=what, cwd=cwd)


def _needed_packages(apt: _PrivateApt, codename: str) -> dict[str, str]:
    """
    :return: package -> version of what a real install of the newest lavapipe would install or upgrade
    """
    out = None
    for target in (f"{_PACKAGE}/{codename}-backports", _PACKAGE):
        try:
            out = apt("install", "-s", "--no-install-recommends", target, what=f"apt-get install -s {target}")
            break
        except RuntimeError as e:
            # Not in backports (a newer Debian): take the release's own version
            if "was not found" not in str(e) and "Unable to locate" not in str(e):
                raise
    if out is None:
        raise RuntimeError(f"apt finds no {_PACKAGE} package")
    packages = dict(re.findall(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ", out, flags=re.M))
    if _PACKAGE not in packages:
        raise RuntimeError(f"apt would not install {_PACKAGE}:\n{out[-2000:]}")
    version = tuple(int(x) for x in re.findall(r"\d+", packages[_PACKAGE].split(":")[-1])[:2])
    if version < MIN_MESA_VERSION:
        raise RuntimeError(
            f"newest {_PACKAGE} found is {packages[_PACKAGE]}, SAPIEN needs Mesa >= "
            + ".".join(map(str, MIN_MESA_VERSION))
        )
    core = sorted(_CORE_PACKAGES & packages.keys())
    if core:
        raise RuntimeError(f"{_PACKAGE} {packages[_PACKAGE]} needs newer {', '.join(core)} than this system has")
    return {name: version for name, version in packages.items() if name not in _SKIP_PACKAGES}


# --- ELF ----------------------------------------------------------------------------------------


def _elf_dynamic(path: Path) -> tuple[Optional[str], list[str]]:
    """
    Read the SONAME and the NEEDED entries of a shared library.

    :param path: ELF file
    :return: (soname or None, needed sonames); (None, []) for a file that is not ELF
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None, []
        is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
        header_format = end + ("HHIQQQIHHH" if is64 else "HHIIIIIHHH")
        header = struct.unpack(header_format, f.read(struct.calcsize(header_format)))
        phoff, phentsize, phnum = header[4], header[8], header[9]
        loads, dynamic = [], None
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if is64:
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack(end + "IIQQQQQQ", f.read(56))
            else:
                p_type, p_offset, p_vaddr, _, p_filesz, _, _, _ = struct.unpack(end + "IIIIIIII", f.read(32))
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return None, []
        f.seek(dynamic[0])
        raw = f.read(dynamic[1])
        entry = struct.Struct(end + ("qQ" if is64 else "iI"))
        tags: list[tuple[int, int]] = [entry.unpack_from(raw, o) for o in range(0, len(raw) - entry.size + 1, entry.size)]
        strtab = strsz = None
        for tag, value in tags:
            if tag == 0:  # DT_NULL
                break
            if tag == 5:  # DT_STRTAB (an address: map it to a file offset)
                strtab = next((value - va + off for va, off, size in loads if va <= value < va + size), None)
            elif tag == 10:  # DT_STRSZ
                strsz = value
        if strtab is None or strsz is None:
            return None, []
        f.seek(strtab)
        strings = f.read(strsz)

    def name(offset: int) -> str:
        end_of_name = strings.index(b"\0", offset)
        return strings[offset:end_of_name].decode()

    soname, needed = None, []
    for tag, value in tags:
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            needed.append(name(value))
        elif tag == 14:  # DT_SONAME
            soname = name(value)
    return soname, needed


def _elf_problem(path: Path) -> Optional[str]:
    """What is wrong with the ELF file ``path``, or None if it is whole: a file cut short (a killed copy, a full
    disk) still opens, and the loader then dies by SIGBUS with nothing printed.

    :param path: ELF file
    :return: a description of the problem, or None
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            ident = f.read(16)
            if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                return "not an ELF file"
            is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
            header_format = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
            raw = f.read(struct.calcsize(header_format))
            if len(raw) < struct.calcsize(header_format):
                return f"truncated: {size} bytes, shorter than its ELF header"
            header = struct.unpack(header_format, raw)
            phoff, shoff, phentsize, phnum, shentsize, shnum = header[4], header[5], *header[8:12]
            # The file must hold its program headers, every loaded segment and its section headers.
            needed = max(phoff + phnum * phentsize, shoff + shnum * shentsize if shoff else 0)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                entry = f.read(56 if is64 else 32)
                if len(entry) < (56 if is64 else 32):
                    break  # reported below: the program headers end past the file
                if is64:
                    _, _, p_offset, _, _, p_filesz, _, _ = struct.unpack(end + "IIQQQQQQ", entry)
                else:
                    _, p_offset, _, _, p_filesz, _, _, _ = struct.unpack(end + "IIIIIIII", entry)
                needed = max(needed, p_offset + p_filesz)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None if size >= needed else f"truncated: {size} bytes, its ELF headers need {needed}"


def _preload_order(driver: Path, index: dict[str, Path]) -> list[str]:
    """
    :param driver: the Vulkan driver library
    :param index: soname -> file of the privately unpacked libraries
    :return: the private libraries the driver needs (directly or not), each after its own private needs
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: Path) -> None:
        for soname in _elf_dynamic(path)[1]:
            if soname in index and soname not in seen:
                seen.add(soname)
                visit(index[soname])
                order.append(soname)

    visit(driver)
    return order


# --- install / activate -------------------------------------------------------------------------


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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sb3_elmur.envs.vulkan", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("install", "check"))
    parser.add_argument("--dir", default=None, help=f"install folder (default: ${DIR_ENV_VAR} or {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            print(install(args.dir, verbose=True))
        except RuntimeError as e:
            print(f"install failed: {e}", file=sys.stderr)
            return 1
        return 0
    reason = check(args.dir)
    if reason is not None:
        print(reason)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
