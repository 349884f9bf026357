"""Just enough of the ELF format to install a shared library by hand: its SONAME and NEEDED entries (which private
libraries the driver needs, in which order to load them), and whether a file is whole."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Iterator, Optional


def _elf_header(f: BinaryIO) -> Optional[tuple[bool, str, tuple[int, ...]]]:
    """
    Read the ELF header of the open file ``f``.

    :param f: a file open for binary reading, at its start
    :return: None for a file that is not ELF, else (64-bit, ``struct`` byte order, the header's fields after
        ``e_ident``: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize,
        e_phnum, e_shentsize, e_shnum, e_shstrndx)
    :raise struct.error: for a file shorter than its header
    """
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
    header_format = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    return is64, end, struct.unpack(header_format, f.read(struct.calcsize(header_format)))


def _segments(f: BinaryIO, is64: bool, end: str, header: tuple[int, ...]) -> Iterator[tuple[int, int, int, int]]:
    """
    The program headers of an ELF file.

    :param f: the open file
    :param is64: whether it is a 64-bit ELF file
    :param end: its ``struct`` byte order
    :param header: its header fields (:func:`_elf_header`)
    :return: (p_type, p_offset, p_vaddr, p_filesz) of each
    :raise struct.error: at a program header that the file cuts short
    """
    phoff, phentsize, phnum = header[4], header[8], header[9]
    for i in range(phnum):
        f.seek(phoff + i * phentsize)
        # The fields are in another order in 32-bit files
        if is64:
            p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack(end + "IIQQQQQQ", f.read(56))
        else:
            p_type, p_offset, p_vaddr, _, p_filesz, _, _, _ = struct.unpack(end + "IIIIIIII", f.read(32))
        yield p_type, p_offset, p_vaddr, p_filesz


def _elf_dynamic(path: Path) -> tuple[Optional[str], list[str]]:
    """
    Read the SONAME and the NEEDED entries of a shared library.

    :param path: ELF file
    :return: (soname or None, needed sonames); (None, []) for a file that is not ELF
    """
    with open(path, "rb") as f:
        elf = _elf_header(f)
        if elf is None:
            return None, []
        is64, end, header = elf
        loads, dynamic = [], None
        for p_type, p_offset, p_vaddr, p_filesz in _segments(f, is64, end, header):
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
            try:
                elf = _elf_header(f)
            except struct.error:
                return f"truncated: {size} bytes, shorter than its ELF header"
            if elf is None:
                return "not an ELF file"
            is64, end, header = elf
            phoff, shoff, phentsize, phnum, shentsize, shnum = header[4], header[5], *header[8:12]
            # The file must hold its program headers, every loaded segment and its section headers.
            needed = max(phoff + phnum * phentsize, shoff + shnum * shentsize if shoff else 0)
            try:
                for _, p_offset, _, p_filesz in _segments(f, is64, end, header):
                    needed = max(needed, p_offset + p_filesz)
            except struct.error:
                pass  # reported below: the program headers end past the file
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
