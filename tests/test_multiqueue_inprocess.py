"""The pure parts of the reader threads (session/queues.py, session/direct.py), in process: no
mount, no root. A SOCK_SEQPACKET socket stands in for /dev/fuse (one write is one message).

What it proves:
- a READ request is recognised and parsed; every other request (and a truncated one) is left
  to the trio thread; a reply gets the bytes up to the file's end, none past it;
- a reply from the cache file is one message, header and bytes, the same from a mapping as
  from a copy; a range the file no longer holds (truncated behind our back) sends nothing,
  so that the engine can answer instead;
- an INTERRUPT that reaches the trio thread before its request (read by another thread)
  still cancels it;
- an open's DirectFile is in the session's table before the open is answered, and gone once
  it is released (the kernel sends no READ of it after).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

import pytest
import trio

from fusecache.session import protocol as p
from fusecache.session.direct import DataReplier, ReadRequest, read_request, reply_length
from fusecache.session.kernel import KernelSession, SessionConfig
from fusecache.session.mount import MountSpec
from fusecache.session.types import Context, OpenReply

HANG_GUARD = 10.0


def request(opcode: int, unique: int, args: bytes = b"", nodeid: int = 1) -> memoryview:
    header = p.IN_HEADER.pack(p.IN_HEADER.size + len(args), opcode, unique, nodeid, 0, 0, 1, 0, 0)
    return memoryview(header + args)


def test_a_read_request_is_parsed_and_others_are_left_alone():
    read = request(p.Op.READ, 9, p.READ_IN.pack(42, 3 << 20, 1 << 20, 0, 0, 0, 0))
    assert read_request(read) == ReadRequest(unique=9, fh=42, offset=3 << 20, size=1 << 20)
    assert read_request(read[:-8]) is None  # truncated: the trio thread's parser answers it
    assert read_request(request(p.Op.OPEN, 9, p.OPEN_IN.pack(os.O_RDONLY, 0))) is None
    assert read_request(request(p.Op.READDIR, 9, p.READ_IN.pack(42, 0, 4096, 0, 0, 0, 0))) is None


@pytest.mark.parametrize("size, offset, file_size, length", [
    (1 << 20, 0, 5 << 20, 1 << 20), (1 << 20, 4 << 20, (4 << 20) + 7, 7),
    (4096, 100, 100, 0), (4096, 200, 100, 0), (0, 0, 100, 0)])
def test_a_reply_gets_the_bytes_up_to_the_files_end(size, offset, file_size, length):
    assert reply_length(size, offset, file_size) == length


@pytest.fixture
def device():
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield kernel, ours
    kernel.close()
    ours.close()


@pytest.mark.parametrize("mapping", [True, False])
def test_a_reply_from_the_cache_file_is_one_message_of_header_and_bytes(tmp_path, device, mapping):
    kernel, ours = device
    data = os.urandom(3 * 65536 + 100)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        replier = DataReplier(ours.fileno())
        replier.mapping = mapping
        for offset, length in ((0, 65536), (65536 + 5, 100_000), (len(data) - 10, 10)):
            assert replier.reply(77, fd, offset, length)
            message = kernel.recv(1 << 20)
            assert p.OUT_HEADER.unpack_from(message) == (p.OUT_HEADER.size + length, 0, 77)
            assert message[p.OUT_HEADER.size:] == data[offset:offset + length]
        assert replier.reply(78, fd, len(data), 0)  # at the end: an empty reply
        assert kernel.recv(1 << 20) == p.pack_out_header(0, 0, 78)
        os.truncate(tmp_path / "f", 65536)  # shorter than checked: nothing is sent
        assert not replier.reply(79, fd, 60000, 10000)
        kernel.setblocking(False)
        with pytest.raises(BlockingIOError):
            kernel.recv(1 << 20)
    finally:
        os.close(fd)


class WaitingOperations:
    """Opens wait until cancelled (a file being filled); or answer at once with a DirectFile."""

    def __init__(self, direct=None) -> None:
        self.direct = direct
        self.released: list[int] = []

    async def open(self, inode: int, flags: int, ctx: Context) -> OpenReply:
        if self.direct is None:
            await trio.sleep_forever()
        return OpenReply(fh=5, keep_cache=True, direct=self.direct)

    async def release(self, fh: int) -> None:
        self.released.append(fh)


@dataclass
class FakeDirect:
    fd: int = -1
    size: int = 0

    def unchanged(self) -> bool:
        return True

    def view(self, offset: int, length: int) -> None:
        return None

    def serving(self, offset: int, length: int) -> None:
        pass

    def served(self, offset: int, length: int) -> None:
        pass


def session_on(device, operations) -> KernelSession:
    session = KernelSession(operations, MountSpec(mountpoint="/nonexistent", fsname="test"),
                            SessionConfig(workers=2, max_background=4, passthrough=False, queues=4))
    session.fd = os.dup(device[1].fileno())
    os.set_blocking(session.fd, False)
    return session


async def reply_of(kernel: socket.socket) -> tuple[int, int, bytes]:
    await trio.lowlevel.wait_readable(kernel)
    data = kernel.recv(1 << 16)
    length, error, unique = p.OUT_HEADER.unpack_from(data)
    return unique, -error, data[p.OUT_HEADER.size:]


async def test_an_interrupt_before_its_request_still_cancels_it(device):
    session = session_on(device, WaitingOperations())
    try:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                assert session._dispatch(nursery, request(p.Op.INTERRUPT, 8, p.INTERRUPT_IN.pack(7)))
                assert session._dispatch(nursery, request(p.Op.OPEN, 7, p.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=2))
                assert await reply_of(device[0]) == (7, errno.EINTR, b"")
        assert session._in_flight.empty()
    finally:
        os.close(session.fd)


async def test_an_opens_direct_file_is_served_from_until_its_release(device):
    direct = FakeDirect()
    operations = WaitingOperations(direct)
    session = session_on(device, operations)
    try:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                session._dispatch(nursery, request(p.Op.OPEN, 1, p.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=2))
                unique, error, payload = await reply_of(device[0])
                assert (unique, error, p.OPEN_OUT.unpack(payload)[0]) == (1, 0, 5)
                assert dict(session.direct) == {5: direct}
                session._dispatch(nursery, request(p.Op.RELEASE, 2, p.RELEASE_IN.pack(5, 0, 0, 0), nodeid=2))
                assert await reply_of(device[0]) == (2, 0, b"")
        assert dict(session.direct) == {} and operations.released == [5]
    finally:
        os.close(session.fd)
