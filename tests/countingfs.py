"""A tiny pass-through FUSE filesystem used as SOURCE in tests: it counts every byte read
through it and can inject faults. It stands in for the network filesystem, so the tests can
check what fusecache read from its source without trusting fusecache's own counters.

    python countingfs.py ROOT MOUNTPOINT STATE_DIR

STATE_DIR/counts.json is rewritten after every read: {relpath: bytes read}.
STATE_DIR/faults.json, if present, is read on every read: {relpath: {"eio_from": offset}}
makes reads of relpath that touch bytes at or after offset fail with EIO; {"delay": seconds}
delays every read of relpath (a slow link; other requests are served meanwhile) until the
delay is over or lifted, and creates STATE_DIR/held as one starts.
Files are opened with direct_io, so the kernel caches nothing and every read is counted.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pyfuse3
import trio


class CountingFS(pyfuse3.Operations):
    def __init__(self, root: str, state_dir: str) -> None:
        super().__init__()
        self.root = root
        self.state_dir = state_dir
        self.paths = {pyfuse3.ROOT_INODE: ""}
        self.inodes = {"": pyfuse3.ROOT_INODE}
        self.fds: dict[int, tuple[int, str]] = {}
        self.counts: dict[str, int] = {}

    def _inode(self, rel: str) -> int:
        if rel not in self.inodes:
            self.inodes[rel] = len(self.paths) + 1
            self.paths[self.inodes[rel]] = rel
        return self.inodes[rel]

    def _full(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _attr(self, rel: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._full(rel))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        attr = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks"):
            setattr(attr, name, getattr(st, name))
        attr.st_ino = self._inode(rel)
        attr.st_blksize = 4096
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    async def lookup(self, parent, name, ctx=None):
        base = self.paths[parent]
        rel = os.path.join(base, os.fsdecode(name)) if base else os.fsdecode(name)
        return self._attr(rel)

    async def getattr(self, inode, ctx=None):
        return self._attr(self.paths[inode])

    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self._full(self.paths[inode])))

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, inode, start_id, token):
        base = self.paths[inode]
        names = sorted(os.listdir(self._full(base)))
        for i in range(start_id, len(names)):
            rel = os.path.join(base, names[i]) if base else names[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attr(rel), i + 1):
                break

    async def open(self, inode, flags, ctx):
        rel = self.paths[inode]
        try:
            fd = os.open(self._full(rel), os.O_RDONLY)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        self.fds[fd] = (fd, rel)
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    def _faults(self) -> dict:
        try:
            with open(os.path.join(self.state_dir, "faults.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    async def read(self, fh, off, size):
        fd, rel = self.fds[fh]
        fault = self._faults().get(rel, {})
        if off + size > fault.get("eio_from", float("inf")):
            raise pyfuse3.FUSEError(errno.EIO)
        if fault.get("delay"):
            await self._held(rel, fault["delay"])
        data = os.pread(fd, size, off)
        self.counts[rel] = self.counts.get(rel, 0) + len(data)
        tmp = os.path.join(self.state_dir, "counts.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.counts, f)
        os.replace(tmp, os.path.join(self.state_dir, "counts.json"))
        return data

    async def _held(self, rel: str, delay: float) -> None:
        """Wait `delay` seconds, or until the delay of rel is lifted (faults.json); a file
        `held` in the state dir says a read waits (for a test to act on at the right time)."""
        with open(os.path.join(self.state_dir, "held"), "a"):
            pass
        deadline = trio.current_time() + delay
        while trio.current_time() < deadline and self._faults().get(rel, {}).get("delay"):
            await trio.sleep(min(0.05, delay))

    async def release(self, fh):
        self.fds.pop(fh, None)
        os.close(fh)

    async def statfs(self, ctx):
        return pyfuse3.StatvfsData()


def main() -> None:
    root, mountpoint, state_dir = sys.argv[1:4]
    fs = CountingFS(os.path.realpath(root), state_dir)
    options = set(pyfuse3.default_options) | {"fsname=countingfs", "allow_other"}
    pyfuse3.init(fs, mountpoint, options)
    open(os.path.join(state_dir, "ready"), "w").close()
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
