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
import functools
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass

# Raised whenever a field is added, removed or changes meaning. 2: Backing.kept.
FORMAT = 2
# The formats this fusecache reads: a restart off an earlier release hands over format 1,
# read as format 2 with no id marked kept, which format 1 says by leaving the id's inode
# without passthrough handles (Passthrough.import_state). A daemon asked for a restart by
# one that does not read its FORMAT refuses (handover.py).
READS = frozenset({1, FORMAT})


# An integer of either sign: a version's mtime and ctime (a file dated before 1970 has a
# negative one). Every other number in a state (inodes, counts, handles, ids) is non-negative.
Signed = typing.NewType("Signed", int)


def formats_read() -> dict[str, object]:
    """What a request for a daemon's state says of the formats its asker reads: "formats", and
    "format", which is all that releases before format 2 look at (they accept their own, 1)."""
    return {"format": min(READS), "formats": sorted(READS)}


def asker_reads(request: dict, format_: int = FORMAT) -> bool:
    """Whether the asker of a request made with formats_read() (by this release or an earlier
    one, which sent "format" alone) reads states of format_."""
    formats = request.get("formats")
    return format_ in formats if isinstance(formats, list) else request.get("format") == format_


class StateError(Exception):
    """A state this fusecache cannot take: another format, or damaged (the message says which)."""


class OtherFormat(StateError):
    """A state of another format: another release of fusecache wrote it."""


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
    version: tuple[Signed, ...]
    lookups: int


@dataclass(frozen=True)
class PathState:
    """A path the kernel holds inodes of: the version seen last and its epoch."""

    relpath: str
    latest: tuple[Signed, ...]
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
    # never closed by its daemon: after a crash, the kernel may hold opens on it that the
    # journal missed (passthrough.InodeIO.kept); handed on by every later restart
    kept: bool = False


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


@dataclass(frozen=True)
class BackingIds:
    """The backing ids alone, as the journal keeps them beside the state (journal.py): written
    before the kernel hears of an id and before one is closed, where the whole state, which
    grows with every inode the kernel holds, would cost each such open and release a write
    of all of it."""

    format: int
    pid: int
    journal: str  # sha256 of the journal these ids were written after (journal.read pairs them)
    backing: list[Backing]


Message = typing.TypeVar("Message", LiveState, BackingIds)


def encode(state: LiveState | BackingIds) -> bytes:
    """state as JSON. Not dataclasses.asdict, which deep-copies every value: for a journal of
    20,000 held inodes that took half a second of the event loop, against a fifth here."""
    return json.dumps(state, default=_fields, separators=(",", ":")).encode()


def _fields(value: object) -> dict[str, object]:
    """A dataclass of the state as the JSON object of its fields (json writes the rest)."""
    return {name: getattr(value, name) for name in _field_names(type(value))}


@functools.cache
def _field_names(kind: type) -> tuple[str, ...]:
    """The fields of a dataclass; TypeError for a type a state does not hold."""
    return tuple(f.name for f in dataclasses.fields(kind))


def decode(data: bytes) -> LiveState:
    """The state in data; StateError, one line, if it is of another format or damaged."""
    return from_json(_parsed(data))


def decode_backing(data: bytes) -> BackingIds:
    """The backing ids in data; StateError as for decode()."""
    return _typed(BackingIds, _parsed(data))


def from_json(raw: object) -> LiveState:
    """decode() of JSON already parsed."""
    return _typed(LiveState, raw)


def _parsed(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError as e:
        raise StateError(f"damaged state: not JSON ({e})") from None


def _typed(kind: type[Message], raw: object) -> Message:
    """raw as kind, a message of a format in READS; StateError naming what is wrong where."""
    if not isinstance(raw, dict) or "format" not in raw:
        raise StateError("damaged state: no format version")
    if raw["format"] not in READS or isinstance(raw["format"], bool):
        raise OtherFormat(f"state format {raw['format']!r}, this fusecache reads formats "
                          f"{', '.join(map(str, sorted(READS)))}")
    try:
        if raw["format"] == 1:
            _as_format_2(raw)
        return _decoder(kind)(raw)
    except _Damaged as e:
        raise StateError(f"damaged state: state{''.join(reversed(e.where))} {e.what}") from None


def _as_format_2(raw: dict) -> None:
    """A format 1 message in place as format 2: no backing id marked kept."""
    adapter = raw.get("adapter", raw)  # a LiveState's, or BackingIds' own list
    backing = adapter.get("backing") if isinstance(adapter, dict) else None
    for b in backing if isinstance(backing, list) else []:
        if isinstance(b, dict) and "kept" not in b:
            b["kept"] = False


class _Damaged(Exception):
    """A value that is not what its field holds; `where` gathers the path to it, innermost
    first, as the exception passes up (built only when a state is refused)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.where: list[str] = []


@functools.cache
def _decoder(kind: typing.Any) -> Callable[[object], typing.Any]:
    """A function turning parsed JSON into kind, checked all the way down (_Damaged if it is
    not): made once per type, since resolving the types again for each of 20,000 held inodes
    took seconds."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        fields = {name: _decoder(hints[name]) for name in _field_names(kind)}

        def dataclass_(value: object) -> typing.Any:
            if not isinstance(value, dict):
                raise _Damaged("is not an object")
            if value.keys() != fields.keys():
                raise _Damaged(f"has fields {sorted(value)}, expected {sorted(fields)}")
            typed = {}
            for name, field in fields.items():
                try:
                    typed[name] = field(value[name])
                except _Damaged as e:
                    e.where.append(f".{name}")
                    raise
            return kind(**typed)
        return dataclass_
    if origin is list or origin is tuple:  # list[X], tuple[X, ...]
        item = _decoder(typing.get_args(kind)[0])

        def sequence(value: object) -> typing.Any:
            if not isinstance(value, list):
                raise _Damaged("is not a list")
            typed = []
            for i, v in enumerate(value):
                try:
                    typed.append(item(v))
                except _Damaged as e:
                    e.where.append(f"[{i}]")
                    raise
            return typed if origin is list else tuple(typed)
        return sequence
    if kind is bool:
        def boolean(value: object) -> bool:
            if not isinstance(value, bool):
                raise _Damaged("is not a boolean")
            return value
        return boolean
    if kind is Signed:
        def signed(value: object) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _Damaged("is not an integer")
            return value
        return signed
    if kind is int:
        def integer(value: object) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _Damaged("is not a non-negative integer")
            return value
        return integer
    if kind is str:
        def string(value: object) -> str:
            if not isinstance(value, str):
                raise _Damaged("is not a string")
            return value
        return string
    raise TypeError(f"no decoding for {kind!r}")
