"""Helpers shared by test files (no test file imports another): source trees, POSIX ACLs
written as bytes, code run as another user, and what reader processes run."""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fusecache import acl
from fusecache.acl import Tag
from fusecache.checkpoint import load_digest

from .bench.throughput import resident_fraction  # noqa: F401 - the benchmarks measure it too

NOBODY = 65534


# ---- source trees ---------------------------------------------------------------------------

def fill(root: Path, files: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """Write files of the given sizes under root (random bytes, reproducible from seed)."""
    rng = random.Random(seed)
    contents = {}
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[name] = rng.randbytes(size)
        path.write_bytes(contents[name])
    return contents


def deep_tree(root: Path, data: bytes, depth: int = 24, name_len: int = 200) -> str:
    """depth directories of name_len-byte names below root (a path far past PATH_MAX), with a
    file `f` holding data and a symlink `link` to it at the bottom; returns the directories'
    relative path. Built a directory at a time: no path call takes such a path whole."""
    names = [f"{i:03d}".ljust(name_len, "d") for i in range(depth)]
    fd = os.open(root, os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            parent, fd = fd, os.open(name, os.O_DIRECTORY, dir_fd=fd)
            os.close(parent)
        file_fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        with os.fdopen(file_fd, "wb") as f:
            f.write(data)
        os.symlink("f", "link", dir_fd=fd)
    finally:
        os.close(fd)
    return "/".join(names)


# ---- POSIX ACLs -----------------------------------------------------------------------------

_TAGS = {"u": (Tag.USER_OBJ, Tag.USER), "g": (Tag.GROUP_OBJ, Tag.GROUP),
         "m": (Tag.MASK, Tag.MASK), "o": (Tag.OTHER, Tag.OTHER)}


def entries(text: str) -> list[tuple[int, int, int | None]]:
    """'u::rw-,u:65534:---,g::r--,m::r--,o::r--' (getfacl's short form) as (tag, perm, id)."""
    result = []
    for item in text.split(","):
        kind, qualifier, perms = item.split(":")
        tag = _TAGS[kind][1 if qualifier else 0]
        perm = sum(bit for bit, char in zip((4, 2, 1), perms) if char != "-")
        result.append((tag, perm, int(qualifier) if qualifier else None))
    return result


def encode(items: list[tuple[int, int, int | None]], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF if id_ is None else id_) for tag, perm, id_ in items)


def set_acl(path: Path, text: str) -> None:
    os.setxattr(path, acl.XATTR_ACCESS, encode(entries(text)))


def supports_acls(directory: Path) -> bool:
    probe = directory / ".acl-probe"
    probe.touch()
    try:
        set_acl(probe, "u::rw-,u:1:r--,g::r--,m::r--,o::r--")
        return acl.read_access_acl(str(probe)) is not None
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        probe.unlink()


# ---- other users and processes --------------------------------------------------------------

# The test's own interpreter may live where other users cannot reach (/root/.pyenv); the
# probes only need the standard library.
OTHER_USERS_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                           if os.access(p, os.X_OK)), sys.executable)


def as_user(code: str, uid: int = NOBODY, timeout: float = 30) -> str:
    """Run Python code as another user (no supplementary groups); its stdout."""
    result = subprocess.run([OTHER_USERS_PYTHON, "-c", textwrap.dedent(code)], user=uid, group=uid,
                            extra_groups=[], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def print_load_digest(path: str, seed: int) -> None:
    """What a reader process runs (`python -c`): load a checkpoint in a seeded order, print its digest."""
    print(load_digest(Path(path), order_seed=seed))


# Opens the file O_DIRECT, says so, and reads 1 MiB from its start into an aligned buffer.
DIRECT_READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
print("open", flush=True)
os.preadv(fd, [mmap.mmap(-1, 1 << 20)], 0)
"""


def wait_until(condition, what: str, timeout: float) -> None:
    """Until condition() holds; fails the test, naming `what`, after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(0.05)


def settled(value, quiet: float = 0.5, timeout: float = 30) -> int:
    """value() once it has not changed for `quiet` seconds (a counter still moving after the
    process that drove it was killed: its last requests are answered after it died)."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still changing after {timeout:.0f}s"
        time.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


def reader_processes(pid: int) -> list[int]:
    """The processes pid started: a daemon's reader processes, where it has them."""
    return [int(child) for task in Path(f"/proc/{pid}/task").glob("*/children") for child in task.read_text().split()]


def waits_in_fuse(pid: int) -> bool:
    """Whether the process sleeps in the kernel's FUSE code (a request sent, no answer yet)."""
    try:
        return "fuse" in Path(f"/proc/{pid}/stack").read_text()
    except OSError:
        return False


def mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of the file at path (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = line.rstrip("\n").endswith(" " + path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total
