"""What one daemon hands the next so that it can serve a live FUSE connection: the INIT
parameters the kernel negotiated, the inodes the kernel holds, and the handles it has open.

A restart (handover.py) sends it over the control socket beside the /dev/fuse descriptor.
It is a typed, versioned message: plain dataclasses, sent as JSON, read back by `decode`,
which checks every field's type and refuses a state of another FORMAT (a daemon of another
fusecache whose state it might misread) or a damaged one with StateError, one line. A
misread state would answer old inode numbers with the wrong files, so nothing is guessed.

Relative paths are str as the adapter keeps them (os.fsdecode, lone surrogates for bytes that
are not UTF-8): JSON carries those as \\udcxx escapes and gives them back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

# Raised whenever a field is added, removed or changes meaning.
FORMAT = 1


class StateError(Exception):
    """A state this fusecache cannot take: another format, or damaged (the message says which)."""


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled with the kernel; a session that adopts the connection must not
    expect INIT again."""

    minor: int
    flags: int  # the INIT flags we answered (flags | flags2 << 32)


@dataclass(frozen=True)
class HeldInode:
    """An inode the kernel holds: its number, what it names, and its lookup count."""

    number: int
    relpath: str
    version: tuple[int, ...]
    lookups: int


@dataclass(frozen=True)
class PathState:
    """A path the kernel holds inodes of: the version seen last and its epoch."""

    relpath: str
    latest: tuple[int, ...]
    epoch: int


@dataclass(frozen=True)
class OpenFile:
    """An open file handle: the inode it was opened on, and whether the kernel reads it itself."""

    fh: int
    inode: int
    passthrough: bool


@dataclass(frozen=True)
class OpenDir:
    fh: int
    relpath: str


@dataclass(frozen=True)
class Backing:
    """A backing id registered for an inode's passthrough opens: valid on the connection,
    so in whichever process holds its descriptor, and closed at that inode's last release."""

    inode: int
    backing_id: int


@dataclass(frozen=True)
class AdapterState:
    """The FUSE adapter's tables (fs.FuseOperations, inodes.InodeTable, passthrough.Passthrough)."""

    inodes: list[HeldInode]
    paths: list[PathState]
    files: list[OpenFile]
    dirs: list[OpenDir]
    backing: list[Backing]
    next_fh: int


@dataclass(frozen=True)
class LiveState:
    format: int
    pid: int  # of the daemon that wrote it, for the log
    session: Negotiated
    adapter: AdapterState


def encode(state: LiveState) -> bytes:
    return json.dumps(dataclasses.asdict(state), separators=(",", ":")).encode()


def decode(data: bytes) -> LiveState:
    """The state in data; StateError, one line, if it is of another format or damaged."""
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise StateError(f"damaged state: not JSON ({e})") from None
    return from_json(raw)


def from_json(raw: object) -> LiveState:
    """decode() of JSON already parsed."""
    if not isinstance(raw, dict) or "format" not in raw:
        raise StateError("damaged state: no format version")
    if raw["format"] != FORMAT:
        raise StateError(f"state format {raw['format']!r}, this fusecache reads format {FORMAT}")
    return _typed(LiveState, raw, "state")


def _typed(kind: typing.Any, value: object, where: str) -> typing.Any:
    """value (parsed JSON) as kind, checked all the way down; StateError naming where it is not."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise StateError(f"damaged state: {where} is not an object")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        if set(value) != names:
            raise StateError(f"damaged state: {where} has fields {sorted(value)}, expected {sorted(names)}")
        return kind(**{name: _typed(hints[name], value[name], f"{where}.{name}") for name in names})
    if origin is list:
        if not isinstance(value, list):
            raise StateError(f"damaged state: {where} is not a list")
        (item,) = typing.get_args(kind)
        return [_typed(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, list):
            raise StateError(f"damaged state: {where} is not a list")
        item = typing.get_args(kind)[0]
        return tuple(_typed(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind is bool:
        if not isinstance(value, bool):
            raise StateError(f"damaged state: {where} is not a boolean")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StateError(f"damaged state: {where} is not a non-negative integer")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise StateError(f"damaged state: {where} is not a string")
        return value
    raise TypeError(f"no decoding for {kind!r} ({where})")
