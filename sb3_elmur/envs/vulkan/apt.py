"""apt with a state of its own: the machine's Debian release and apt sources (the mirror it uses), a private
sources list with that release's backports, and what a real install of the newest lavapipe would bring in."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Optional

# SAPIEN needs VK_KHR_external_semaphore_fd and descriptorBindingPartiallyBound from lavapipe
MIN_MESA_VERSION = (24, 3)

_PACKAGE = "mesa-vulkan-drivers"
# SAPIEN ships its own Vulkan loader (used when the system has none), so the loader package is not needed
_SKIP_PACKAGES = {"libvulkan1"}
# These cannot be swapped in a running process: a driver that needs newer ones is of no use
_CORE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6"}


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
