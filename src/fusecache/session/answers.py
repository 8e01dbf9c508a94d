"""The answers to requests about names, attributes and directories (the kernel session's):
each calls the adapter and sends its reply, or raises what `types.reply_errno` turns into
the reply's errno. The requests about open files (OPEN, READ, RELEASE) stay with the session
(kernel.py), which keeps their handles and the reader threads' table of them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from . import protocol as p
from .types import Attributes, Context, Operations

# Sends a reply: (unique, errno, *payload) -> whether anyone still waits for it.
Send = Callable[..., bool]


class MetadataAnswers:
    """One handler per request kind, as the session's dispatch table calls them."""

    def __init__(self, operations: Operations, send: Send) -> None:
        self.operations = operations
        self.send = send

    # A reply nobody waits for any more (interrupted, or sent twice: a reader process's death
    # has the kernel send again every request not yet answered) is not taken by the kernel,
    # which then never forgets what it would have counted, nor releases what it would have
    # opened: undone here.

    async def lookup(self, header: p.InHeader, args: memoryview) -> None:
        attr = await self.operations.lookup(header.nodeid, name_in(args), context_of(header))
        if not self.send(header.unique, 0, p.pack_entry(attr)):
            self.operations.forget([(attr.ino, 1)])

    async def getattr(self, header: p.InHeader, args: memoryview) -> None:
        attr = await self.operations.getattr(header.nodeid, context_of(header))
        self.send(header.unique, 0, p.pack_attr_out(attr))

    async def readlink(self, header: p.InHeader, args: memoryview) -> None:
        self.send(header.unique, 0, await self.operations.readlink(header.nodeid, context_of(header)))

    async def statfs(self, header: p.InHeader, args: memoryview) -> None:
        self.send(header.unique, 0, p.pack_statfs(await self.operations.statfs(context_of(header))))

    async def opendir(self, header: p.InHeader, args: memoryview) -> None:
        fh = await self.operations.opendir(header.nodeid, context_of(header))
        if not self.send(header.unique, 0, p.OPEN_OUT.pack(fh, 0, 0)):
            await self.operations.releasedir(fh)

    async def readdir(self, header: p.InHeader, args: memoryview) -> None:
        fh, offset, size = p.READ_IN.unpack_from(args)[:3]
        plus = header.opcode == p.Op.READDIRPLUS
        records: list[bytes] = []
        inodes: list[int] = []
        used = 0

        def add(name: bytes, attr: Attributes, next_offset: int) -> bool:
            nonlocal used
            if used + p.dirent_size(name, plus) > size:
                return False
            record = p.pack_dirent(name, attr, next_offset, plus)
            records.append(record)
            inodes.append(attr.ino)
            used += len(record)
            return True

        try:
            await self.operations.readdir(fh, offset, add, counts_lookups=plus)
        except BaseException:  # answered with the error: the kernel never sees what was taken
            if plus:
                self.operations.forget([(inode, 1) for inode in inodes])
            raise
        if not self.send(header.unique, 0, b"".join(records)) and plus:  # one buffer: writev takes 1024 at most
            self.operations.forget([(inode, 1) for inode in inodes])

    async def releasedir(self, header: p.InHeader, args: memoryview) -> None:
        await self.operations.releasedir(p.RELEASE_IN.unpack_from(args)[0])
        self.send(header.unique, 0)

    async def getxattr(self, header: p.InHeader, args: memoryview) -> None:
        size = p.GETXATTR_IN.unpack_from(args)[0]
        value = await self.operations.getxattr(header.nodeid, name_in(args[p.GETXATTR_IN.size:]),
                                               context_of(header))
        self.send_sized(header.unique, size, value)

    async def listxattr(self, header: p.InHeader, args: memoryview) -> None:
        size = p.GETXATTR_IN.unpack_from(args)[0]
        names = await self.operations.listxattr(header.nodeid, context_of(header))
        self.send_sized(header.unique, size, b"".join(name + b"\0" for name in names))

    def send_sized(self, unique: int, size: int, value: bytes) -> None:
        """An xattr reply: the length when asked with size 0, else the value if it fits."""
        if size == 0:
            self.send(unique, 0, p.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self.send(unique, errno.ERANGE)
        else:
            self.send(unique, 0, value)

    async def access(self, header: p.InHeader, args: memoryview) -> None:
        await self.operations.access(header.nodeid, p.ACCESS_IN.unpack_from(args)[0], context_of(header))
        self.send(header.unique, 0)

    async def ok(self, header: p.InHeader, args: memoryview) -> None:
        self.send(header.unique, 0)


def context_of(header: p.InHeader) -> Context:
    return Context(header.uid, header.gid, header.pid)


def name_in(args: memoryview) -> bytes:
    """A NUL-terminated name at the start of args."""
    data = bytes(args)
    end = data.find(b"\0")
    return data if end < 0 else data[:end]
